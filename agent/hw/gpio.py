"""gpiozero devices: the e-stop button and the status LED.

Devices take a pin factory (gpiozero's ``pin_factory=``), so tests pass gpiozero's
MockFactory and a car gets lgpio. The button sets its level on the drive core's stop board
from gpiozero's callback thread (attribute writes: no lock, no queue that could drop a press).
"""

from __future__ import annotations

from typing import Any

from agent.core.stops import StopSource

# Blink patterns (on seconds, off seconds) per state; a fault outranks a mode.
PATTERNS = {
    "fault": (0.1, 0.1),  # fast blink
    "local": (1.0, 0.0),  # steady: driving itself
    "local_angle": (0.5, 0.5),
    "user": (0.1, 0.9),  # a short blip: manual
    "stopped": (0.0, 1.0),
}


class EStopButton:
    """A normally-open button to ground: press latches an e-stop; release only allows a clear."""

    def __init__(self, pin: str, source: StopSource, *, pin_factory: Any = None, bounce_time: float = 0.02) -> None:
        from gpiozero import Button

        self.source = source
        self.pin = pin
        self.button = Button(pin, pull_up=True, bounce_time=bounce_time, pin_factory=pin_factory)
        self.button.when_pressed = self._pressed
        self.button.when_released = self._released
        if self.button.is_pressed:  # held at start: the car must not move
            self._pressed()

    def _pressed(self) -> None:
        self.source.hold(True, f"button {self.pin} pressed")

    def _released(self) -> None:
        self.source.hold(False)

    def close(self) -> None:
        self.button.close()


class StatusLed:
    def __init__(self, pin: str, *, pin_factory: Any = None) -> None:
        from gpiozero import LED

        self.led = LED(pin, pin_factory=pin_factory)
        self.state: str | None = None

    def show(self, mode: str, faults: list[str]) -> None:
        """Blink the pattern for the car's state; called from the supervisor side, not the drive thread."""
        state = "fault" if faults else mode
        if state == self.state:
            return
        self.state = state
        on, off = PATTERNS.get(state, PATTERNS["stopped"])
        if off == 0.0:
            self.led.on()
        elif on == 0.0:
            self.led.off()
        else:
            self.led.blink(on_time=on, off_time=off, background=True)

    def close(self) -> None:
        self.led.close()
