"""Health of the computer itself, where the platform exposes it (a Raspberry Pi does)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")
THROTTLED = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")  # Raspberry Pi firmware
FLAGS = {0: "undervoltage", 1: "arm_frequency_capped", 2: "throttled", 3: "soft_temperature_limit"}


def platform_health() -> dict[str, Any]:
    health: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        health["cpu_temp_c"] = round(int(THERMAL.read_text().strip()) / 1000.0, 1)
    with contextlib.suppress(OSError, ValueError):
        bits = int(THROTTLED.read_text().strip(), 16)
        health["power_flags"] = [name for bit, name in FLAGS.items() if bits & (1 << bit)]
    return health
