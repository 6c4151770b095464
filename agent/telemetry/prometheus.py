"""A local Prometheus text endpoint for scrapers and technicians (no web framework: one asyncio server).

Counters and cumulative histograms are kept here, fed from the drive core's metrics ring: each
``update`` adds the rows written since the last one (the ring holds 51 s at 20 Hz; the supervisor
updates every second, so no row is missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import numpy as np

from agent.core.control import MODES
from agent.core.drive import DriveCore
from agent.core.faults import Fault
from agent.core.metrics import INDEX

log = logging.getLogger("donkey-agent.metrics")

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # milliseconds
HISTOGRAMS = {
    "donkey_period_error_ms": ("period_error_ms", "Error of the interval between actuations (ms)."),
    "donkey_frame_age_ms": ("frame_age_ms", "Camera frame age at actuation (ms)."),
    "donkey_invoke_ms": ("invoke_ms", "Model inference time (ms), cycles that ran the model."),
    "donkey_loop_overhead_ms": ("overhead_ms", "The loop's own work per cycle, excluding inference (ms)."),
}


class Histogram:
    def __init__(self) -> None:
        self.counts = np.zeros(len(BUCKETS) + 1, dtype=np.int64)
        self.total = 0.0

    def add(self, values: np.ndarray) -> None:
        if len(values):
            self.counts += np.bincount(np.searchsorted(BUCKETS, values, side="left"), minlength=len(BUCKETS) + 1)
            self.total += float(values.sum())

    def lines(self, name: str) -> list[str]:
        cumulative = np.cumsum(self.counts)
        lines = [f'{name}_bucket{{le="{bound}"}} {cumulative[i]}' for i, bound in enumerate(BUCKETS)]
        lines.append(f'{name}_bucket{{le="+Inf"}} {cumulative[-1]}')
        lines += [f"{name}_sum {self.total:.6f}", f"{name}_count {cumulative[-1]}"]
        return lines


class MetricsExporter:
    def __init__(self, core: DriveCore, extra: Callable[[], dict[str, float]] | None = None) -> None:
        self.core = core
        self.extra = extra
        self.histograms = {name: Histogram() for name in HISTOGRAMS}
        self._seen = 0
        self.rows_lost = 0

    def update(self) -> None:
        metrics = self.core.metrics
        cycles = metrics.cycles
        new = cycles - self._seen
        if new <= 0:
            return
        if new > metrics.capacity:
            self.rows_lost += new - metrics.capacity
        rows = metrics.recent(min(new, metrics.capacity))
        self._seen = cycles
        for name, (column, _) in HISTOGRAMS.items():
            values = rows[:, INDEX[column]]
            if column == "invoke_ms":
                values = values[rows[:, INDEX["decided"]] == 1.0]
            self.histograms[name].add(values)

    def render(self) -> str:
        self.update()
        core, metrics = self.core, self.core.metrics
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        metric("donkey_loop_cycles_total", "counter", "Drive-loop cycles completed.",
               [f"donkey_loop_cycles_total {metrics.cycles}"])
        metric("donkey_deadline_misses_total", "counter", "Cycles that finished after their deadline.",
               [f"donkey_deadline_misses_total {metrics.deadline_misses}"])
        metric("donkey_frames_missed_total", "counter", "Cycles that found no new camera frame.",
               [f"donkey_frames_missed_total {metrics.frames_missed}"])
        metric("donkey_frames_dropped_total", "counter", "Camera frames the loop never saw.",
               [f"donkey_frames_dropped_total {metrics.frames_dropped}"])
        metric("donkey_missed_periods_total", "counter", "Timer-paced periods skipped because the loop was late.",
               [f"donkey_missed_periods_total {self.core.keeper.missed_periods if self.core.keeper else 0}"])
        metric("donkey_drive_thread_cpu_seconds_total", "counter", "CPU time of the drive thread (kernel accounting).",
               [f"donkey_drive_thread_cpu_seconds_total {self.core.thread_cpu_s():.2f}"])
        metric("donkey_deadman_trips_total", "counter", "Times the dead-man monitor wrote neutral for a stalled core.",
               [f"donkey_deadman_trips_total {self.core.deadman.trips}"])
        metric("donkey_metrics_rows_lost_total", "counter", "Loop rows overwritten before this exporter read them.",
               [f"donkey_metrics_rows_lost_total {self.rows_lost}"])
        for name, (_, help_text) in HISTOGRAMS.items():
            metric(name, "histogram", help_text, self.histograms[name].lines(name))
        status = core.status()
        metric("donkey_mode", "gauge", "The drive mode (1 for the current one).",
               [f'donkey_mode{{mode="{mode}"}} {int(status["mode"] == mode)}' for mode in MODES])
        metric("donkey_fault_active", "gauge", "Active faults (1 while active).",
               [f'donkey_fault_active{{fault="{fault.value}"}} {int(fault.value in status["faults"])}'
                for fault in Fault])
        metric("donkey_max_throttle", "gauge", "The throttle limit.", [f"donkey_max_throttle {status['max_throttle']}"])
        for name, value in (self.extra() if self.extra else {}).items():
            metric(name, "gauge", name.replace("_", " ") + ".", [f"{name} {value}"])
        return "\n".join(out) + "\n"


MAX_HEADERS = 100


async def _answer(writer: asyncio.StreamWriter, status: str, content: str, body: bytes) -> None:
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content}\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n".encode() + body)
    await asyncio.wait_for(writer.drain(), 5.0)


async def serve(exporter: MetricsExporter, listen: str, stop: asyncio.Event) -> None:
    """Serve GET /metrics on ``host:port`` until ``stop``; a bind failure is logged, never fatal."""
    host, _, port = listen.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            for _ in range(MAX_HEADERS):  # headers: read and ignored, a bounded number
                if not (await asyncio.wait_for(reader.readline(), 5.0)).strip():
                    break
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, status = exporter.render().encode(), "200 OK"
                content = "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, content = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            await _answer(writer, status, content, body)
        except (ValueError, asyncio.LimitOverrunError):  # a line over the reader's 64 KiB limit
            with contextlib.suppress(ConnectionError, TimeoutError):
                await _answer(writer, "431 Request Header Fields Too Large", "text/plain", b"request too large\n")
        except (TimeoutError, ConnectionError, UnicodeError, asyncio.IncompleteReadError) as exc:
            log.debug("metrics request failed: %s", exc)
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(handle, host or "127.0.0.1", int(port))
    except (OSError, ValueError) as exc:
        log.warning("metrics endpoint %s not started: %s", listen, exc)
        return
    log.info("metrics on http://%s/metrics", listen)
    async with server:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            exporter.update()
