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
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
    assert status == 200 and missing == 404
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
