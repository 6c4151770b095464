"""Read a calibrated car's DonkeyCar ``myconfig.py`` and produce our ``[actuators]`` section.

The file is parsed, never executed: only literal assignments are read (``ast.literal_eval``),
so importing a config cannot run its code. DonkeyCar 5.x keeps the values in the
``PWM_STEERING_THROTTLE`` dict; 4.x configs had top-level ``STEERING_LEFT_PWM`` etc. and
``STEERING_CHANNEL``/``THROTTLE_CHANNEL``; both are understood (the dict wins).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from agent.config import ActuatorsConfig, CalibrationConfig, Pca9685Config
from agent.errors import AgentError

KEYS = {  # DonkeyCar key -> our calibration field
    "STEERING_LEFT_PWM": "steering_left_pwm",
    "STEERING_RIGHT_PWM": "steering_right_pwm",
    "PWM_STEERING_INVERTED": "steering_inverted",
    "PWM_STEERING_SCALE": "steering_scale",
    "THROTTLE_FORWARD_PWM": "throttle_forward_pwm",
    "THROTTLE_STOPPED_PWM": "throttle_stopped_pwm",
    "THROTTLE_REVERSE_PWM": "throttle_reverse_pwm",
    "PWM_THROTTLE_INVERTED": "throttle_inverted",
    "PWM_THROTTLE_SCALE": "throttle_scale",
}
PCA_PIN = re.compile(r"^PCA9685\.(\d+):([0-9a-fA-Fx]+)\.(\d+)$")


class DonkeyConfigError(AgentError, ValueError):
    """The DonkeyCar config cannot be used; the message says why."""


def _literals(source: str, path: Path) -> dict[str, Any]:
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise DonkeyConfigError(f"{path}:{exc.lineno}: not valid Python: {exc.msg}") from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue  # computed values (e.g. os.path.join) are not calibration
    return values


def _pin(pin: Any, role: str, path: Path) -> tuple[int, int, int] | None:
    if pin is None:
        return None
    match = PCA_PIN.match(str(pin))
    if not match:
        raise DonkeyConfigError(f"{path}: PWM_{role}_PIN {pin!r} is not a PCA9685 pin "
                                "(PCA9685.<bus>:<addr>.<channel>); "
                           "only PCA9685 outputs are supported")
    bus, address, channel = match.groups()
    return int(bus), int(address, 16), int(channel)


def import_myconfig(path: Path) -> ActuatorsConfig:
    values = _literals(path.read_text(encoding="utf-8"), path)
    drive_train = values.get("DRIVE_TRAIN_TYPE", "PWM_STEERING_THROTTLE")
    if drive_train not in ("PWM_STEERING_THROTTLE", "I2C_SERVO"):
        raise DonkeyConfigError(f"{path}: DRIVE_TRAIN_TYPE {drive_train!r} is not supported (PWM_STEERING_THROTTLE is)")
    merged = {**values, **(values.get("PWM_STEERING_THROTTLE") or {})}
    calibration = {ours: merged[theirs] for theirs, ours in KEYS.items() if theirs in merged}
    steering = _pin(merged.get("PWM_STEERING_PIN"), "STEERING", path)
    throttle = _pin(merged.get("PWM_THROTTLE_PIN"), "THROTTLE", path)
    pca: dict[str, Any] = {}
    if steering and throttle:
        if steering[:2] != throttle[:2]:
            raise DonkeyConfigError(f"{path}: steering and throttle are on different PCA9685 boards; not supported")
        pca = {"i2c_bus": steering[0], "address": steering[1], "steering_channel": steering[2],
               "throttle_channel": throttle[2]}
    else:  # DonkeyCar 4.x
        if "STEERING_CHANNEL" in values:
            pca["steering_channel"] = values["STEERING_CHANNEL"]
        if "THROTTLE_CHANNEL" in values:
            pca["throttle_channel"] = values["THROTTLE_CHANNEL"]
        if values.get("PCA9685_I2C_ADDR") is not None:
            pca["address"] = values["PCA9685_I2C_ADDR"]
        if values.get("PCA9685_I2C_BUSNUM") is not None:
            pca["i2c_bus"] = values["PCA9685_I2C_BUSNUM"]
    try:
        return ActuatorsConfig(backend="pca9685", pca9685=Pca9685Config(**pca),
                               calibration=CalibrationConfig(**calibration))
    except ValueError as exc:
        raise DonkeyConfigError(f"{path}: values out of range: {exc}") from None


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if key == "address":
        return f"0x{value:02x}"
    return repr(value)


def to_toml(actuators: ActuatorsConfig) -> str:
    """The ``[actuators]`` section to paste into agent.toml."""
    lines = ["[actuators]", f'backend = "{actuators.backend}"', "", "[actuators.pca9685]"]
    lines += [f"{k} = {_toml_value(k, v)}" for k, v in actuators.pca9685.model_dump().items()]
    lines += ["", "[actuators.calibration]"]
    lines += [f"{k} = {_toml_value(k, v)}" for k, v in actuators.calibration.model_dump().items()]
    return "\n".join(lines) + "\n"
