"""``donkey-agent safe-stop``: put the configured actuators in neutral, whatever state the agent is in.

Standalone (it does not talk to a running agent), idempotent, and quick: systemd runs it as
``ExecStopPost=`` so that even an agent killed by SIGKILL or the watchdog leaves no throttle on.
"""

from __future__ import annotations

import time
from typing import Any

from agent.config import AgentConfig
from agent.hw.interfaces import ActuatorError

ATTEMPTS = 3


def safe_stop(config: AgentConfig, *, i2c: Any = None) -> tuple[int, str]:
    """Exit code and a one-line report. ``i2c`` injects a bus (tests); by default the configured one."""
    if config.actuators.backend == "twin":
        # A simulator removes a car when its connection closes; a new connection would be a new
        # car. The agent's own stop sends neutral before it disconnects.
        return 0, "twin: the simulator removed the agent's car when its connection closed; nothing to stop"
    from agent.hw.factory import HardwareUnavailableError
    from agent.hw.pca9685 import Pca9685Actuators

    try:
        actuators = Pca9685Actuators.open(config.actuators.pca9685, config.actuators.calibration, i2c=i2c)
    except HardwareUnavailableError as exc:
        return 69, f"safe-stop: {exc}"
    last_error: ActuatorError | None = None
    for _ in range(ATTEMPTS):
        try:
            actuators.neutral()
            pca = config.actuators.pca9685
            return 0, (f"safe-stop: PCA9685 0x{pca.address:02x} channels {pca.steering_channel} (steering) and "
                       f"{pca.throttle_channel} (throttle) at neutral")
        except ActuatorError as exc:
            last_error = exc
            time.sleep(0.05)
    return 1, f"safe-stop: could not write neutral after {ATTEMPTS} attempts: {last_error}"
