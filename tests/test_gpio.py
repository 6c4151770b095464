"""The e-stop button and status LED on gpiozero's MockFactory (a Raspberry Pi 4B)."""

from __future__ import annotations

import time

import pytest

from agent.core.handoff import CommandQueue
from agent.hw.gpio import EStopButton, StatusLed

gpiozero = pytest.importorskip("gpiozero", reason="gpiozero is in the test extra")
from gpiozero.pins.mock import MockFactory, MockPWMPin  # noqa: E402


@pytest.fixture
def factory():
    factory = MockFactory(revision="c03111", pin_class=MockPWMPin)
    yield factory
    factory.reset()


def test_button_press_and_release_become_estop_commands(factory) -> None:
    commands = CommandQueue()
    button = EStopButton("GPIO17", commands, pin_factory=factory, bounce_time=None)
    pin = factory.pin(17)
    pin.drive_low()  # pressed (to ground, pulled up)
    pin.drive_high()
    deadline = time.monotonic() + 2
    while len(commands) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    items = commands.drain()
    assert [(c.name, c.value, c.source) for c in items] == [("estop", True, "button"), ("estop", False, "button")]
    button.close()


def test_led_patterns(factory) -> None:
    led = StatusLed("GPIO22", pin_factory=factory)
    pin = factory.pin(22)
    led.show("local", [])
    assert pin.state == 1
    led.show("local", ["estop"])  # fault: blinking fast
    time.sleep(0.35)
    states = [bool(s.state) for s in pin.states]
    assert states.count(True) >= 2 and states.count(False) >= 2
    led.show("user", [])
    led.close()
