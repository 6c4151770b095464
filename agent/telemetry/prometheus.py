"""A local Prometheus endpoint for scrapers and technicians, through prometheus-client.

A custom collector (``DriveCollector``) turns the drive core's state into metric families at scrape time:
counters and cumulative histograms fed from the core's preallocated metrics ring (each ``update`` adds the
rows written since the last one; the ring holds 51 s at 20 Hz and the daemon updates every second, so no
row is missed), gauges from its published snapshot and from the daemon (fleet link, recorder, simulator
link). The drive thread never calls ``observe()``: it only writes its ring. ``generate_latest`` renders the
text format, or OpenMetrics when the scraper asks for it; the asyncio server below serves it (no web
framework, no extra thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics

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
MAX_HEADERS = 100


class Histogram:
    """Cumulative bucket counts and a sum, added to from the ring's rows."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(BUCKETS) + 1, dtype=np.int64)
        self.total = 0.0

    def add(self, values: np.ndarray) -> None:
        if len(values):
            self.counts += np.bincount(np.searchsorted(BUCKETS, values, side="left"), minlength=len(BUCKETS) + 1)
            self.total += float(values.sum())

    def family(self, name: str, help_text: str) -> HistogramMetricFamily:
        cumulative = np.cumsum(self.counts)
        buckets = [(str(bound), float(cumulative[i])) for i, bound in enumerate(BUCKETS)]
        buckets.append(("+Inf", float(cumulative[-1])))
        return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=self.total)


def counter_family(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)  # rendered as <name>_total


class DriveCollector:
    """prometheus-client's collector interface over the drive core and the daemon's extra gauges."""

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

    def collect(self) -> Iterator[Metric]:
        self.update()
        core, metrics = self.core, self.core.metrics
        keeper = core.keeper

        yield counter_family("donkey_loop_cycles", "Drive-loop cycles completed.", metrics.cycles)
        yield counter_family("donkey_deadline_misses", "Cycles that finished after their deadline.",
                             metrics.deadline_misses)
        yield counter_family("donkey_frames_missed", "Cycles that found no new camera frame.", metrics.frames_missed)
        yield counter_family("donkey_frames_dropped", "Camera frames the loop never saw.", metrics.frames_dropped)
        yield counter_family("donkey_missed_periods", "Timer-paced periods skipped because the loop was late.",
                      keeper.missed_periods if keeper else 0)
        yield counter_family("donkey_drive_thread_cpu_seconds", "CPU time of the drive thread (kernel accounting).",
                      core.thread_cpu_s())
        yield counter_family("donkey_deadman_trips", "Times the dead-man monitor wrote neutral for a stalled core.",
                      core.deadman.trips)
        yield counter_family("donkey_metrics_rows_lost", "Loop rows overwritten before this exporter read them.",
                      self.rows_lost)
        for name, (_, help_text) in HISTOGRAMS.items():
            yield self.histograms[name].family(name, help_text)
        snapshot = core.snapshot
        mode = GaugeMetricFamily("donkey_mode", "The drive mode (1 for the current one).", labels=["mode"])
        for each in MODES:
            mode.add_metric([each], float(snapshot.mode == each))
        yield mode
        faults = GaugeMetricFamily("donkey_fault_active", "Active faults (1 while active).", labels=["fault"])
        for fault in Fault:
            faults.add_metric([fault.value], float(fault.value in snapshot.faults))
        yield faults
        yield GaugeMetricFamily("donkey_max_throttle", "The throttle limit.", value=snapshot.max_throttle)
        yield from self._pacing()
        for name, value in (self.extra() if self.extra else {}).items():
            if name.endswith("_total"):
                yield counter_family(name.removesuffix("_total"), name.replace("_", " ") + ".", value)
            else:
                yield GaugeMetricFamily(name, name.replace("_", " ") + ".", value=value)

    def _pacing(self) -> Iterator[Metric]:
        status = self.core.pacer.status()
        if "output_offset_ms" not in status:
            return
        yield GaugeMetricFamily("donkey_phase_locked", "1 while the loop is locked to the camera's clock.",
                                value=float(status["locked"]))
        yield GaugeMetricFamily("donkey_camera_period_ms", "The camera's period as the phase lock measures it (ms).",
                                value=status["camera_period_ms"])
        yield GaugeMetricFamily("donkey_jitter_guard_ms", "How late a frame may be and still be on time (ms).",
                                value=status["jitter_guard_ms"])
        yield GaugeMetricFamily("donkey_output_offset_ms", "The output's offset from the predicted frame (ms).",
                                value=status["output_offset_ms"])
        yield counter_family("donkey_late_outputs", "Decisions ready after their slot (written at once).",
                             status["late_outputs"])
        yield counter_family("donkey_held_outputs", "Slots written with no new frame (the last decision held).",
                             status["held_outputs"])
        yield counter_family("donkey_late_frames", "Frames handed to the loop after their slot's cut-off.",
                             status["late_frames"])
        yield counter_family("donkey_relocks", "Times the phase lock was lost and acquired again.", status["relocks"])


class MetricsExporter:
    """The registry with the drive collector, rendered on request in the format the scraper asks for."""

    def __init__(self, core: DriveCore, extra: Callable[[], dict[str, float]] | None = None) -> None:
        self.collector = DriveCollector(core, extra)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def update(self) -> None:
        self.collector.update()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The body and its content type: OpenMetrics if ``accept`` asks for it, else the text format."""
        if "application/openmetrics-text" in accept:
            return openmetrics.generate_latest(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return text_format.generate_latest(self.registry), text_format.CONTENT_TYPE_LATEST


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
            accept = ""
            for _ in range(MAX_HEADERS):  # headers: a bounded number, only Accept is used
                line = (await asyncio.wait_for(reader.readline(), 5.0)).strip()
                if not line:
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "accept":
                    accept = value
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, content = exporter.render(accept)
                await _answer(writer, "200 OK", content, body)
            else:
                await _answer(writer, "404 Not Found", "text/plain", b"not found: try /metrics\n")
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
