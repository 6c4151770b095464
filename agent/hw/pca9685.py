"""Steering servo and ESC on a PCA9685, with DonkeyCar's calibration semantics.

DonkeyCar (``PWM_STEERING_THROTTLE``) stores pulses as 12-bit PCA9685 counts at 60 Hz:
steering maps [-1, 1] linearly onto [STEERING_LEFT_PWM, STEERING_RIGHT_PWM], throttle onto
[THROTTLE_REVERSE_PWM, THROTTLE_STOPPED_PWM, THROTTLE_FORWARD_PWM], both floored to an integer
(``utils.map_range``); ``set_pulse`` then applies inversion and scale. We reproduce those
counts exactly and write them through adafruit-circuitpython-pca9685, whose 16-bit
``duty_cycle`` is the count shifted left by four. Unlike DonkeyCar we never sweep the ESC
through max and min at start (a full-throttle blip): arming is neutral only.
"""

from __future__ import annotations

import contextlib
from typing import Any

from agent.config import CalibrationConfig, Pca9685Config
from agent.hw.interfaces import ActuatorError

FULL_OFF = 0  # duty_cycle < 0x10: the channel's OFF register gets its full-off bit


def map_range(x: float, x_min: float, x_max: float, y_min: float, y_max: float) -> int:
    """DonkeyCar's ``utils.map_range``: linear, then floored."""
    ratio = (x_max - x_min) / (y_max - y_min)
    return int(((x - x_min) / ratio + y_min) // 1)


def steering_count(angle: float, calibration: CalibrationConfig) -> int:
    angle = max(-1.0, min(1.0, angle))
    return map_range(angle, -1.0, 1.0, calibration.steering_left_pwm, calibration.steering_right_pwm)


def throttle_count(throttle: float, calibration: CalibrationConfig) -> int:
    throttle = max(-1.0, min(1.0, throttle))
    if throttle > 0:
        return map_range(throttle, 0.0, 1.0, calibration.throttle_stopped_pwm, calibration.throttle_forward_pwm)
    return map_range(throttle, -1.0, 0.0, calibration.throttle_reverse_pwm, calibration.throttle_stopped_pwm)


def register_count(pulse: int, *, inverted: bool, scale: float) -> int:
    """DonkeyCar's ``PulseController.set_pulse`` and ``set_duty_cycle``: the OFF count written."""
    pulse = max(0, min(4095, pulse))
    if inverted:
        pulse = 4095 - pulse
    duty = int(pulse * scale) / 4095
    return int(4096 * min(1.0, duty))


class Pca9685Actuators:
    """Two PCA9685 channels: steering and throttle. ``pca`` is an ``adafruit_pca9685.PCA9685``."""

    def __init__(self, pca: Any, config: Pca9685Config, calibration: CalibrationConfig) -> None:
        self.pca = pca
        self.config = config
        self.calibration = calibration
        try:
            pca.frequency = config.frequency_hz
            self._steering = pca.channels[config.steering_channel]
            self._throttle = pca.channels[config.throttle_channel]
        except OSError as exc:
            raise ActuatorError(f"PCA9685 at 0x{config.address:02x}: {exc}") from exc
        self.centre = steering_count(0.0, calibration)
        self.stopped = throttle_count(0.0, calibration)

    @classmethod
    def open(cls, config: Pca9685Config, calibration: CalibrationConfig, i2c: Any = None) -> Pca9685Actuators:
        """Open the board on ``config.i2c_bus`` (Blinka on a Pi), or on an injected bus."""
        from agent.hw.factory import HardwareUnavailableError

        try:
            from adafruit_pca9685 import PCA9685
        except ImportError as exc:
            raise HardwareUnavailableError(
                f"adafruit-circuitpython-pca9685 is not installed ({exc}); pip install donkey-edge-agent[pi]"
            ) from None
        if i2c is None:
            try:
                from adafruit_extended_bus import ExtendedI2C

                i2c = ExtendedI2C(config.i2c_bus)
            except ImportError:
                try:
                    import board
                    import busio

                    i2c = busio.I2C(board.SCL, board.SDA)
                except (ImportError, NotImplementedError, RuntimeError, ValueError) as exc:
                    raise HardwareUnavailableError(
                        f"no I2C bus {config.i2c_bus}: {exc} (enable I2C with raspi-config; the agent's user needs "
                        "the i2c group)"
                    ) from None
            except (OSError, ValueError) as exc:
                raise HardwareUnavailableError(f"/dev/i2c-{config.i2c_bus}: {exc}") from None
        try:
            pca = PCA9685(i2c, address=config.address)
        except (OSError, ValueError) as exc:
            raise HardwareUnavailableError(
                f"no PCA9685 at 0x{config.address:02x} on I2C bus {config.i2c_bus}: {exc} (check wiring and "
                "`i2cdetect -y 1`)"
            ) from None
        return cls(pca, config, calibration)

    def _write(self, channel: Any, pulse: int, *, inverted: bool, scale: float) -> None:
        count = register_count(pulse, inverted=inverted, scale=scale)
        value = 0xFFFF if count >= 4096 else count << 4
        try:
            channel.duty_cycle = value
        except OSError as exc:
            raise ActuatorError(f"PCA9685 at 0x{self.config.address:02x}: {exc}") from exc

    def arm(self) -> None:
        self.neutral()

    def write(self, steering: float, throttle: float) -> None:
        cal = self.calibration
        self._write(self._steering, steering_count(steering, cal), inverted=cal.steering_inverted,
                    scale=cal.steering_scale)
        self._write(self._throttle, throttle_count(throttle, cal), inverted=cal.throttle_inverted,
                    scale=cal.throttle_scale)

    def neutral(self) -> None:
        self.write(0.0, 0.0)

    def detach(self) -> None:
        """Stop pulses on both channels (servo limp, ESC sees no signal): distinct from neutral."""
        for channel in (self._steering, self._throttle):
            try:
                channel.duty_cycle = FULL_OFF
            except OSError as exc:
                raise ActuatorError(f"PCA9685 at 0x{self.config.address:02x}: {exc}") from exc

    def close(self) -> None:
        """Leave the car at neutral (an ESC without pulses may hold its last throttle on some models)."""
        with contextlib.suppress(ActuatorError):
            self.neutral()
