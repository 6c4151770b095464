"""The autopilot: DonkeyCar-trained .tflite models run unchanged on LiteRT."""

from agent.pilot.model import Autopilot, ModelError, PilotOutput

__all__ = ["Autopilot", "ModelError", "PilotOutput"]
