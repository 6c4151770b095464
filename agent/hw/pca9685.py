"""Steering servo and ESC on a PCA9685, with DonkeyCar's calibration semantics.

DonkeyCar (``PWM_STEERING_THROTTLE``) stores pulses as 12-bit PCA9685 counts at 60 Hz:
steering maps [-1, 1] linearly onto [STEERING_LEFT_PWM, STEERING_RIGHT_PWM], throttle onto
[THROTTLE_REVERSE_PWM, THROTTLE_STOPPED_PWM, THROTTLE_FORWARD_PWM], both floored to an integer
(``utils.map_range``); ``set_pulse`` then applies inversion and scale. We reproduce those
counts exactly and write them through adafruit-circuitpython-pca9685, whose 16-bit
``duty_cycle`` is the count shifted left by four. Unlike DonkeyCar we never sweep the ESC
through max and min at start (a full-throttle blip): arming is neutral only.

Every command writes throttle first, then steering, and each channel on its own: a failed
steering write must never leave the motor running, and a failed throttle write must not also
leave the wheels turned. Only then is one error raised, naming the channel(s) that failed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

from agent.config import CalibrationConfig, Pca9685Config
from agent.hw.interfaces import ActuatorError

log = logging.getLogger(__name__)

FULL_OFF = 0  # duty_cycle < 0x10: the channel's OFF register gets its full-off bit
THROTTLE = "throttle"
STEERING = "steering"
# The order of every write: stopping the motor must never wait on (or be skipped by) the servo.
CHANNEL_ORDER: tuple[str, ...] = (THROTTLE, STEERING)


class ChannelWriteError(ActuatorError):
    """Some channels did not take their write; the others were still attempted.

    ``failed`` maps each failed channel's role ("throttle", "steering") to the bus error, so a
    caller such as safe-stop can say which output is in an unknown state and retry only that one.
    """

    def __init__(self, message: str, failed: dict[str, OSError]) -> None:
        super().__init__(message)
        self.failed = failed


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


def finite_or_neutral(steering: float, throttle: float) -> tuple[float, float] | None:
    """``None`` if either value is NaN or infinite: the driver then writes neutral for both.

    Clamping cannot save such a command (``min(1.0, nan)`` is 1.0: full forward, full right), and
    a producer that emits NaN for one output has no trustworthy other output either.
    """
    if math.isfinite(steering) and math.isfinite(throttle):
        return steering, throttle
    return None


def register_count(pulse: int, *, inverted: bool, scale: float) -> int:
    """DonkeyCar's ``PulseController.set_pulse`` and ``set_duty_cycle``: the OFF count written."""
    pulse = max(0, min(4095, pulse))
    if inverted:
        pulse = 4095 - pulse
    duty = int(pulse * scale) / 4095
    return int(4096 * min(1.0, duty))


def duty_cycle(count: int) -> int:
    """The driver's 16-bit ``duty_cycle`` for an OFF count (4096 and above: always on)."""
    return 0xFFFF if count >= 4096 else count << 4


class Pca9685Actuators:
    """Two PCA9685 channels: steering and throttle. ``pca`` is an ``adafruit_pca9685.PCA9685``."""

    def __init__(self, pca: Any, config: Pca9685Config, calibration: CalibrationConfig) -> None:
        self.pca = pca
        self.config = config
        self.calibration = calibration
        try:
            pca.frequency = config.frequency_hz
            self._channels: dict[str, Any] = {THROTTLE: pca.channels[config.throttle_channel],
                                              STEERING: pca.channels[config.steering_channel]}
        except OSError as exc:
            raise ActuatorError(f"PCA9685 at 0x{config.address:02x}: {exc}") from exc
        self.centre = steering_count(0.0, calibration)
        self.stopped = throttle_count(0.0, calibration)
        # Commands with NaN or infinity that reached the driver (written as neutral instead). The
        # drive core filters them out upstream, so any count here is a bug worth seeing.
        self.non_finite = 0

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

    def channel_index(self, role: str) -> int:
        """The PCA9685 channel number of ``role`` ("throttle" or "steering")."""
        return self.config.throttle_channel if role == THROTTLE else self.config.steering_channel

    def counts(self, steering: float, throttle: float) -> dict[str, int]:
        """The OFF counts DonkeyCar would write for this command, by role."""
        cal = self.calibration
        return {
            THROTTLE: register_count(throttle_count(throttle, cal), inverted=cal.throttle_inverted,
                                     scale=cal.throttle_scale),
            STEERING: register_count(steering_count(steering, cal), inverted=cal.steering_inverted,
                                     scale=cal.steering_scale),
        }

    def put(self, duty_cycles: dict[str, int]) -> dict[str, OSError]:
        """Write each role's ``duty_cycle`` in CHANNEL_ORDER, every one attempted; the failures, by role.

        Never raises for a bus error, so a caller can retry just the failed roles (safe-stop).
        """
        failed: dict[str, OSError] = {}
        for role in CHANNEL_ORDER:
            if role in duty_cycles:
                try:
                    self._channels[role].duty_cycle = duty_cycles[role]
                except OSError as exc:
                    failed[role] = exc
        return failed

    def describe(self, failed: dict[str, OSError]) -> str:
        """``throttle (channel 0): [Errno 5] ...; steering (channel 1): ...``, in CHANNEL_ORDER."""
        return "; ".join(f"{role} (channel {self.channel_index(role)}): {failed[role]}"
                         for role in CHANNEL_ORDER if role in failed)

    def _put_or_raise(self, duty_cycles: dict[str, int]) -> None:
        failed = self.put(duty_cycles)
        if failed:
            raise ChannelWriteError(f"PCA9685 at 0x{self.config.address:02x}: {self.describe(failed)}", failed)

    def neutral_duty_cycles(self) -> dict[str, int]:
        """Stopped throttle and centred steering, as ``duty_cycle`` values by role."""
        return {role: duty_cycle(count) for role, count in self.counts(0.0, 0.0).items()}

    def arm(self) -> None:
        self.neutral()

    def write(self, steering: float, throttle: float) -> None:
        """Throttle, then steering; both attempted. NaN or infinity anywhere: neutral, counted."""
        command = finite_or_neutral(steering, throttle)
        if command is None:
            self._count_non_finite(steering, throttle)
            self.neutral()
            return
        self._put_or_raise({role: duty_cycle(count) for role, count in self.counts(*command).items()})

    def _count_non_finite(self, steering: float, throttle: float) -> None:
        self.non_finite += 1
        if self.non_finite == 1:  # once: the drive thread must not spend its period logging
            log.warning("PCA9685: non-finite command (steering %s, throttle %s) written as neutral; further ones "
                        "are counted in non_finite", steering, throttle)

    def neutral(self) -> None:
        """Stopped throttle, then centred steering; both attempted, then ChannelWriteError if any failed."""
        self._put_or_raise(self.neutral_duty_cycles())

    def detach(self) -> None:
        """Stop pulses on both channels (servo limp, ESC sees no signal): distinct from neutral.

        Throttle first and both attempted, like every other write.
        """
        self._put_or_raise(dict.fromkeys(CHANNEL_ORDER, FULL_OFF))

    def close(self) -> None:
        """Leave the car at neutral (an ESC without pulses may hold its last throttle on some models)."""
        with contextlib.suppress(ActuatorError):
            self.neutral()
