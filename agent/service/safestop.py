"""``donkey-agent safe-stop``: put the configured actuators in neutral, whatever state the agent is in.

Standalone (it does not talk to a running agent), idempotent, and quick: systemd runs it as
``ExecStopPost=`` so that even an agent killed by SIGKILL or the watchdog leaves no throttle on.

Each attempt writes throttle first, then steering, each on its own; an attempt retries only the
channels that failed before, so a dead steering servo never stops the throttle from being
stopped, and the report names the channel still in an unknown state.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig
from agent.hw.interfaces import ActuatorError

if TYPE_CHECKING:
    from agent.hw.pca9685 import Pca9685Actuators

ATTEMPTS = 3
RETRY_DELAY_S = 0.05  # a glitch on the bus (EMI from the motor, a loose wire) is often gone by then


def safe_stop(config: AgentConfig, *, i2c: Any = None) -> tuple[int, str]:
    """Exit code and a one-line report. ``i2c`` injects a bus (tests); by default the configured one."""
    if config.actuators.backend == "twin":
        # A simulator removes a car when its connection closes; a new connection would be a new
        # car. The agent's own stop sends neutral before it disconnects.
        return 0, "twin: the simulator removed the agent's car when its connection closed; nothing to stop"
    opened = _open(config, i2c)
    if isinstance(opened, tuple):
        return opened
    return _neutral_with_retries(opened)


def _open(config: AgentConfig, i2c: Any) -> Pca9685Actuators | tuple[int, str]:
    """The board, or (exit code, report) once every attempt failed.

    Retried like the writes: a transfer that fails while the driver wakes the chip and sets its
    frequency is as likely to be a glitch as one that fails later. 69 when the board or its
    library is missing, 1 for a bus that errs.
    """
    from agent.hw.factory import HardwareUnavailableError
    from agent.hw.pca9685 import Pca9685Actuators

    pca, calibration = config.actuators.pca9685, config.actuators.calibration
    failure: tuple[int, str] = (1, "")
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(RETRY_DELAY_S)
        try:
            return Pca9685Actuators.open(pca, calibration, i2c=i2c)
        except HardwareUnavailableError as exc:
            failure = (69, f"safe-stop: {exc}")
        except ActuatorError as exc:
            failure = (1, f"safe-stop: could not write neutral: setting up the board failed {ATTEMPTS} times: {exc}")
    return failure


def _neutral_with_retries(actuators: Pca9685Actuators) -> tuple[int, str]:
    """Write neutral, retrying only the channels that failed; throttle always goes first."""
    pending = actuators.neutral_duty_cycles()  # role -> duty_cycle, throttle first
    failed: dict[str, OSError] = {}
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(RETRY_DELAY_S)
        failed = actuators.put(pending)
        pending = {role: value for role, value in pending.items() if role in failed}
        if not failed:
            return 0, _report_ok(actuators)
    return 1, _report_failed(actuators, failed)


def _report_ok(actuators: Pca9685Actuators) -> str:
    pca = actuators.config
    return (f"safe-stop: PCA9685 0x{pca.address:02x} channels {pca.throttle_channel} (throttle) and "
            f"{pca.steering_channel} (steering) at neutral")


def _report_failed(actuators: Pca9685Actuators, failed: dict[str, OSError]) -> str:
    """Which channel is in an unknown state, and (what matters most) whether the throttle is stopped."""
    from agent.hw.pca9685 import CHANNEL_ORDER

    done = [f"{role} (channel {actuators.channel_index(role)})" for role in CHANNEL_ORDER if role not in failed]
    tail = f"; {' and '.join(done)} at neutral" if done else ""
    return f"safe-stop: could not write neutral after {ATTEMPTS} attempts: {actuators.describe(failed)}{tail}"
