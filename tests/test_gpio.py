"""The e-stop button and status LED on gpiozero's MockFactory (a Raspberry Pi 4B)."""

from __future__ import annotations

import time

import pytest

from agent.core.stops import StopBoard
from agent.hw.gpio import EStopButton, StatusLed

gpiozero = pytest.importorskip("gpiozero", reason="gpiozero is in the test extra")
from gpiozero.pins.mock import MockFactory, MockPWMPin  # noqa: E402


@pytest.fixture
def factory():
    factory = MockFactory(revision="c03111", pin_class=MockPWMPin)
    yield factory
    factory.reset()


def _wait(predicate) -> None:
    deadline = time.monotonic() + 2
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_button_level_is_state_on_the_stop_board(factory) -> None:
    board = StopBoard()
    button = EStopButton("GPIO17", board.source("button"), pin_factory=factory, bounce_time=None)
    pin = factory.pin(17)
    pin.drive_low()  # pressed (to ground, pulled up): a press and a held level
    _wait(lambda: board.held_by() == "button")
    assert board.held_by() == "button"
    requests = board.new_requests()
    assert [(r.source, r.reason) for r in requests] == [("button", "button GPIO17 pressed")]
    pin.drive_high()  # released: the level falls; nothing new to latch
    _wait(lambda: board.held_by() == "")
    assert board.held_by() == "" and board.new_requests() == []
    for _ in range(300):  # pressing again and again cannot overflow anything: one latch per new press
        pin.drive_low()
        pin.drive_high()
    _wait(lambda: board.source("button").presses == 301)
    assert len(board.new_requests()) == 1
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
