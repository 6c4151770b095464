"""DonkeyCar Tub v2 datasets: written by the car, read by DonkeyCar's own tools and trainer."""

from agent.tub.recorder import TubRecorder
from agent.tub.writer import STANDARD_INPUTS, STANDARD_TYPES, TubFormatError, TubWriter

__all__ = ["STANDARD_INPUTS", "STANDARD_TYPES", "TubFormatError", "TubRecorder", "TubWriter"]
