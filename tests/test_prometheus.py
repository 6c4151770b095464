"""The local Prometheus endpoint of a running agent, scraped over HTTP."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests import mosquitto
from tests.fakes.parts import wait_for
from tests.test_cli import start_twin

ROOT = Path(__file__).parent.parent


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def raw_request(port: int, request: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


def test_metrics_endpoint(tmp_path: Path) -> None:
    port = mosquitto.free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f'[drive.realtime]\npriority = 0\n[telemetry]\nprometheus = "127.0.0.1:{port}"\n')
    twin, sim_port = start_twin("--track", "generated_track")
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--sim",
                              f"127.0.0.1:{sim_port}", "--model", str(ROOT / "models" / "pilot.tflite")],
                             stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: scrape(port)[0] == 200, 30, interval=0.2)
        time.sleep(2.0)
        _, first = scrape(port)
        time.sleep(1.0)
        status, second = scrape(port)
        missing, _ = scrape(port, "/other")
        openmetrics = raw_request(port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; "
                                        b"version=1.0.0\r\n\r\n")
        huge = raw_request(port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")  # over the 64 KiB line limit
        headers = raw_request(port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 5000 + b"\r\n")
        after, _ = scrape(port)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
    assert status == 200 and missing == 404 and after == 200
    assert b"Content-Type: application/openmetrics-text" in openmetrics and openmetrics.rstrip().endswith(b"# EOF")
    assert sample(second, "donkey_phase_locked") == 1.0  # the default pacing is locked to the twin's frames
    assert 0 < sample(second, "donkey_output_offset_ms") < 20  # the adaptive output offset is reported
    assert huge.startswith(b"HTTP/1.1 431") and headers.startswith(b"HTTP/1.1 200")  # a header flood is bounded
    _, log = agent.communicate(timeout=10)
    assert "Traceback" not in log
    assert "# TYPE donkey_period_error_ms histogram" in second
    cycles_before, cycles_after = sample(first, "donkey_loop_cycles_total"), sample(second, "donkey_loop_cycles_total")
    assert cycles_after >= cycles_before + 10  # a counter that counts (about 20 per second)
    count = sample(second, "donkey_period_error_ms_count")
    assert count >= cycles_before  # cumulative since start, not just the recent ring
    assert sample(second, 'donkey_period_error_ms_bucket{le="+Inf"}') == count
    assert sample(second, 'donkey_mode{mode="local"}') == 1.0
    assert sample(second, 'donkey_fault_active{fault="estop"}') == 0.0
    buckets = [float(v) for v in re.findall(r'^donkey_invoke_ms_bucket\{le="[^"]+"\} (\S+)$', second, re.MULTILINE)]
    assert buckets == sorted(buckets) and buckets[-1] > 0  # cumulative buckets
