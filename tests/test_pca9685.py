"""PCA9685 actuators on a fake I2C bus that emulates the chip's registers."""

from __future__ import annotations

import functools
import math
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from agent.config import CalibrationConfig, Pca9685Config, validate
from agent.hw.interfaces import ActuatorError
from agent.hw.pca9685 import ChannelWriteError, Pca9685Actuators, register_count, steering_count, throttle_count
from agent.service.safestop import safe_stop
from tests.conftest import require_donkeycar
from tests.fakes.extended_bus import ExtendedI2C, read_channel, read_log
from tests.fakes.i2c import FakePca9685Bus

FULL_OFF_BIT = 0x1000


def open_board(bus: FakePca9685Bus, **calibration: Any) -> Pca9685Actuators:
    return Pca9685Actuators.open(Pca9685Config(), CalibrationConfig(**calibration), i2c=bus)


@pytest.mark.parametrize(("angle", "count"), [(-1.0, 460), (0.0, 375), (1.0, 290), (0.5, 332), (-7.0, 460)])
def test_steering_counts_match_donkeycar(angle: float, count: int) -> None:
    assert steering_count(angle, CalibrationConfig()) == count


@pytest.mark.parametrize(("throttle", "count"), [(-1.0, 220), (-0.5, 295), (0.0, 370), (0.5, 435), (1.0, 500)])
def test_throttle_counts_match_donkeycar(throttle: float, count: int) -> None:
    assert throttle_count(throttle, CalibrationConfig()) == count


def test_against_donkeycars_own_arithmetic() -> None:
    map_range = require_donkeycar("donkeycar.utils").map_range

    cal = CalibrationConfig(steering_left_pwm=470, steering_right_pwm=280, throttle_forward_pwm=520,
                            throttle_stopped_pwm=380, throttle_reverse_pwm=230)
    for i in range(-100, 101):
        x = i / 100
        assert steering_count(x, cal) == map_range(x, -1, 1, 470, 280)
        expected = map_range(x, 0, 1, 380, 520) if x > 0 else map_range(x, -1, 0, 230, 380)
        assert throttle_count(x, cal) == expected


def test_frequency_and_neutral_registers() -> None:
    bus = FakePca9685Bus()
    car = open_board(bus)
    assert bus.prescale == 101  # round(25 MHz / 4096 / 60) - 1
    assert bus.registers[0x00] & 0x10 == 0  # awake
    car.arm()
    assert bus.channel(1) == (0, 375)  # steering centred
    assert bus.channel(0) == (0, 370)  # throttle stopped
    # Arming never sweeps the ESC through max and min: only neutral was ever written to it.
    throttle_offs = {data[2] | (data[3] << 8) for reg, data in bus.writes if reg == 0x06}
    assert throttle_offs == {370}


def test_calibrated_pulses_land_in_the_registers() -> None:
    bus = FakePca9685Bus()
    car = open_board(bus)
    car.write(-1.0, 1.0)
    assert bus.channel(1) == (0, 460) and bus.channel(0) == (0, 500)
    car.write(1.0, -1.0)
    assert bus.channel(1) == (0, 290) and bus.channel(0) == (0, 220)
    car.write(0.25, 0.3)
    assert bus.channel(1) == (0, 353) and bus.channel(0) == (0, 409)


def test_inversion_and_scale_follow_donkeycar() -> None:
    bus = FakePca9685Bus()
    car = open_board(bus, steering_inverted=True, throttle_scale=1.2)
    car.write(0.0, 0.0)
    assert bus.channel(1) == (0, register_count(375, inverted=True, scale=1.0)) == (0, 3720)
    assert bus.channel(0) == (0, int(4096 * (int(370 * 1.2) / 4095)))


def test_detach_is_full_off_not_neutral() -> None:
    bus = FakePca9685Bus()
    car = open_board(bus)
    car.neutral()
    car.detach()
    assert bus.channel(0) == (0, FULL_OFF_BIT) and bus.channel(1) == (0, FULL_OFF_BIT)


def test_bus_errors_become_actuator_errors() -> None:
    bus = FakePca9685Bus()
    car = open_board(bus)
    bus.fail_next = 1
    with pytest.raises(ActuatorError, match="0x40"):
        car.write(0.2, 0.2)
    car.write(0.2, 0.2)  # the next transfer works again
    assert bus.channel(0) == (0, 396)


def test_missing_board_is_explained() -> None:
    from agent.hw.factory import HardwareUnavailableError

    with pytest.raises(HardwareUnavailableError, match="no PCA9685 at 0x41"):
        Pca9685Actuators.open(Pca9685Config(address=0x41), CalibrationConfig(), i2c=FakePca9685Bus(0x40))


# -- each channel on its own, throttle first -----------------------------------------------------

STOPPED, CENTRE = 370, 375  # default calibration: throttle_stopped_pwm, centre of 460..290


def driving(bus: FakePca9685Bus, **calibration: Any) -> Pca9685Actuators:
    """A board whose car is under way: 0.6 right, 0.8 forward."""
    car = open_board(bus, **calibration)
    car.write(0.6, 0.8)
    assert bus.channel(0) == (0, 474) and bus.channel(1) == (0, 324)
    return car


def test_a_dead_steering_channel_still_stops_the_throttle() -> None:
    bus = FakePca9685Bus()
    car = driving(bus)
    bus.fail_channel(1)
    with pytest.raises(ChannelWriteError, match=r"0x40: steering \(channel 1\)") as raised:
        car.neutral()
    assert set(raised.value.failed) == {"steering"}
    assert bus.channel(0) == (0, STOPPED)  # the motor is stopped...
    assert bus.channel(1) == (0, 324)  # ...though the servo kept its last pulse
    with pytest.raises(ActuatorError, match="steering"):
        car.write(-0.2, 0.1)
    assert bus.channel(0) == (0, 383)  # a write still reaches the throttle


def test_a_dead_throttle_channel_still_centres_steering_and_names_throttle() -> None:
    bus = FakePca9685Bus()
    car = driving(bus)
    bus.fail_channel(0)
    with pytest.raises(ChannelWriteError) as raised:
        car.neutral()
    assert "throttle (channel 0)" in str(raised.value) and "steering" not in str(raised.value)
    assert set(raised.value.failed) == {"throttle"}
    assert bus.channel(1) == (0, CENTRE)


def test_both_channels_failing_are_both_named_throttle_first() -> None:
    bus = FakePca9685Bus()
    car = driving(bus)
    bus.fail_led_writes = 2
    with pytest.raises(ChannelWriteError, match=r"throttle \(channel 0\): .*; steering \(channel 1\): ") as raised:
        car.neutral()
    assert list(raised.value.failed) == ["throttle", "steering"]


@pytest.mark.parametrize(("throttle_channel", "steering_channel"), [(0, 1), (5, 2)])
def test_throttle_is_written_before_steering(throttle_channel: int, steering_channel: int) -> None:
    bus = FakePca9685Bus()
    car = Pca9685Actuators.open(Pca9685Config(throttle_channel=throttle_channel, steering_channel=steering_channel),
                                CalibrationConfig(), i2c=bus)
    car.arm()
    car.write(0.5, 0.5)
    car.neutral()
    car.detach()
    assert bus.led_writes() == [
        (throttle_channel, STOPPED), (steering_channel, CENTRE),  # arm
        (throttle_channel, 435), (steering_channel, 332),  # write
        (throttle_channel, STOPPED), (steering_channel, CENTRE),  # neutral
        (throttle_channel, FULL_OFF_BIT), (steering_channel, FULL_OFF_BIT),  # detach
    ]


def test_detach_tries_both_channels_throttle_first() -> None:
    bus = FakePca9685Bus()
    car = driving(bus)
    bus.fail_channel(0, times=1)
    with pytest.raises(ChannelWriteError, match=r"throttle \(channel 0\)"):
        car.detach()
    assert bus.channel(1) == (0, FULL_OFF_BIT) and bus.channel(0) == (0, 474)


@pytest.mark.parametrize(("steering", "throttle"), [
    (math.nan, 0.5), (0.5, math.nan), (math.inf, 0.0), (0.0, math.inf), (-math.inf, -0.3), (0.2, -math.inf),
    (math.nan, math.nan),
])
def test_non_finite_commands_are_neutral_at_the_driver_and_counted(steering: float, throttle: float) -> None:
    bus = FakePca9685Bus()
    car = driving(bus)
    car.write(steering, throttle)
    assert bus.channel(0) == (0, STOPPED) and bus.channel(1) == (0, CENTRE)
    car.write(steering, throttle)
    assert car.non_finite == 2


def test_a_non_finite_write_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    car = driving(FakePca9685Bus())
    for _ in range(3):
        car.write(math.nan, 0.4)
    assert car.non_finite == 3
    assert [r.levelname for r in caplog.records if "non-finite" in r.getMessage()] == ["WARNING"]


# -- safe-stop, channel by channel ---------------------------------------------------------------

PCA = validate({"actuators": {"backend": "pca9685"}}, "t")


def test_safe_stop_stops_the_throttle_when_steering_is_dead() -> None:
    bus = FakePca9685Bus()
    driving(bus)
    bus.fail_channel(1)
    code, text = safe_stop(PCA, i2c=bus)
    assert code == 1 and bus.channel(0) == (0, STOPPED)
    assert text == ("safe-stop: could not write neutral after 3 attempts: steering (channel 1): [Errno 5] "
                    "Input/output error; throttle (channel 0) at neutral")


def test_safe_stop_retries_only_the_failed_channel_throttle_first() -> None:
    bus = FakePca9685Bus()
    driving(bus)
    bus.writes.clear()
    bus.fail_channel(0, times=2)  # the throttle answers on the third attempt
    code, text = safe_stop(PCA, i2c=bus)
    assert code == 0 and "at neutral" in text
    assert bus.led_writes() == [(1, CENTRE), (0, STOPPED)]  # steering once (it worked), throttle when it did
    assert bus.channel(0) == (0, STOPPED) and bus.channel(1) == (0, CENTRE)


def test_safe_stop_with_a_dead_throttle_names_it_and_still_centres() -> None:
    bus = FakePca9685Bus()
    driving(bus)
    bus.fail_channel(0)
    code, text = safe_stop(PCA, i2c=bus)
    assert code == 1 and "throttle (channel 0): [Errno 5]" in text and "steering (channel 1) at neutral" in text
    assert bus.channel(1) == (0, CENTRE)


def test_safe_stop_retries_a_glitch_while_opening_the_board() -> None:
    bus = FakePca9685Bus()
    bus.fail_next = 1  # the driver's first transfer (the probe) fails once
    code, _ = safe_stop(PCA, i2c=bus)
    assert code == 0 and bus.channel(0) == (0, STOPPED)


# -- the file-backed bus that stands in for adafruit_extended_bus in the container -------------

def test_the_file_backed_bus_keeps_registers_across_processes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What tests/test_systemd_real.py relies on: open() finds ExtendedI2C, registers outlive the writer."""
    module = types.ModuleType("adafruit_extended_bus")
    module.ExtendedI2C = functools.partial(ExtendedI2C, directory=tmp_path)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "adafruit_extended_bus", module)
    car = Pca9685Actuators.open(Pca9685Config(), CalibrationConfig())
    car.write(0.0, 1.0)
    assert read_channel(tmp_path, 0) == (0, 500)
    car.pca.i2c_device.i2c.deinit()  # the writer is gone; the chip keeps its registers

    code, _ = safe_stop(PCA)  # a new driver instance, as the ExecStopPost process opens one
    assert code == 0 and read_channel(tmp_path, 0) == (0, STOPPED) and read_channel(tmp_path, 1) == (0, CENTRE)
    led = [(w.pid, w.led()) for w in read_log(tmp_path) if w.led()]
    assert [channels for _, channels in led][-4:] == [[(0, 500)], [(1, CENTRE)], [(0, STOPPED)], [(1, CENTRE)]]
    assert {pid for pid, _ in led} == {os.getpid()}


def test_steering_and_throttle_on_one_channel_is_a_config_error() -> None:
    from agent.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"actuators.pca9685: Value error, steering_channel and throttle_channel "
                                          r"are both 3"):
        validate({"actuators": {"pca9685": {"steering_channel": 3, "throttle_channel": 3}}}, "agent.toml")
