"""PCA9685 actuators on a fake I2C bus that emulates the chip's registers."""

from __future__ import annotations

import pytest

from agent.config import CalibrationConfig, Pca9685Config
from agent.hw.interfaces import ActuatorError
from agent.hw.pca9685 import Pca9685Actuators, register_count, steering_count, throttle_count
from tests.conftest import require_donkeycar
from tests.fakes.i2c import FakePca9685Bus

FULL_OFF_BIT = 0x1000


def open_board(bus: FakePca9685Bus, **calibration: object) -> Pca9685Actuators:
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
