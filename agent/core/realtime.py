"""Real-time set-up of the drive thread: attempted, reported, and never fatal.

Each step is tried on the calling thread (Linux applies ``sched_setscheduler`` and
``sched_setaffinity`` with pid 0 to the calling thread only). Where the OS refuses (no
CAP_SYS_NICE or RLIMIT_RTPRIO, no RLIMIT_MEMLOCK, a container), the refusal is recorded with
its fix and the agent keeps running: one warning, not a crash.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
from dataclasses import dataclass, field

from agent.config import RealtimeConfig

log = logging.getLogger(__name__)

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
EINVAL = 22


@dataclass
class RealtimeReport:
    applied: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"applied": self.applied, "refused": self.refused}


def configure_realtime(config: RealtimeConfig) -> RealtimeReport:
    """Apply the real-time settings to the calling thread (and the process-wide ones)."""
    report = RealtimeReport()
    sys.setswitchinterval(config.switch_interval_ms / 1000.0)
    report.applied.append(f"interpreter switch interval {config.switch_interval_ms} ms")

    if config.cpus:
        try:
            os.sched_setaffinity(0, set(config.cpus))
            report.applied.append(f"CPU affinity {sorted(config.cpus)}")
        except OSError as exc:
            report.refused.append(f"CPU affinity {sorted(config.cpus)}: {exc.strerror} (do those CPUs exist?)")

    if config.priority > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(config.priority))
            report.applied.append(f"SCHED_FIFO priority {config.priority}")
        except OSError as exc:
            report.refused.append(
                f"SCHED_FIFO priority {config.priority}: {exc.strerror} (needs CAP_SYS_NICE or LimitRTPRIO in the "
                "systemd unit; under systemd also RestrictRealtime=no)"
            )

    if config.lock_memory:
        # MCL_ONFAULT (Linux 4.4+) locks pages as they are first touched instead of populating
        # every mapping: what the loop uses can never be paged out, and the untouched parts of
        # big shared libraries and 8 MiB thread stacks do not become resident.
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
        if result != 0 and ctypes.get_errno() == EINVAL:
            result = libc.mlockall(MCL_CURRENT | MCL_FUTURE)
        if result == 0:
            report.applied.append("memory locked (mlockall)")
        else:
            errno = ctypes.get_errno()
            report.refused.append(
                f"mlockall: {os.strerror(errno)} (needs CAP_IPC_LOCK or LimitMEMLOCK=infinity in the unit)"
            )

    if report.refused:
        log.warning("real-time set-up partly refused, driving anyway: %s", "; ".join(report.refused))
    return report


class GcControl:
    """Garbage collection outside the hot path: frozen after warm-up, collected in the slack.

    After ``freeze`` automatic collection is off; the drive thread calls ``collect_in_slack``
    after actuating, when it has the rest of the period to spare, so a collection never lands
    between reading a frame and moving the servos.
    """

    def __init__(self, enabled: bool, every_cycles: int = 20) -> None:
        self.enabled = enabled
        self.every_cycles = every_cycles
        self._count = 0
        self.frozen = False

    def freeze(self) -> None:
        if not self.enabled:
            return
        gc.collect()
        gc.freeze()
        gc.disable()
        self.frozen = True

    def collect_in_slack(self) -> None:
        if self.frozen:
            self._count += 1
            if self._count >= self.every_cycles:
                self._count = 0
                gc.collect(0)

    def release(self) -> None:
        if self.frozen:
            gc.unfreeze()
            gc.enable()
            self.frozen = False
