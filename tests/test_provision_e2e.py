"""Provisioning end to end: a fresh Debian root, booted with systemd-nspawn, made a car by ansible/site.yml.

The playbook reaches the booted container through a real Ansible connection (community.docker.nsenter into its
PID 1's namespaces), never by tasks on the host. The car gets the agent from a wheel built from this repository
(its dependencies from a wheel mirror the test serves on the host's loopback), a model bundle the test packed from
models/pilot.tflite and signed with a throw-away key, the key's public half in its trust store, and a client
certificate for the host's mosquitto (mutual TLS, an ACL per car). The twin runs on the host; the container shares
the host's network. Then, with nobody touching the car: it is ready, drives a full lap without leaving the track
and reports to the fleet; a second run changes nothing; it reboots and drives again; `systemctl stop` leaves it in
neutral; a stalled agent is restarted by the watchdog; an e-stop survives a restart. Last, the Fedora branches
(Keylime, IMA, the Fedora boot config) in check mode against Fedora facts on the same container.
"""

from __future__ import annotations

import datetime
import functools
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests import mosquitto, nspawn
from tests.fakes.parts import wait_for
from tests.pki import Pki
from tests.test_mqtt_security import secure_broker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(nspawn.available()), reason=nspawn.available() or "ok"),
    pytest.mark.skipif(bool(mosquitto.available()), reason=mosquitto.available() or "ok"),
]

REPO = nspawn.REPO
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
CAR, FLEET = "car-e2e", "e2e"
HOSTS = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)\s+"
                   r"rescued=(\d+)\s+ignored=(\d+)", re.MULTILINE)
AGENT = "/opt/donkey-agent/venv/bin/donkey-agent"


class Lines:
    """Drains a process's pipe on a thread (a full pipe would block the twin or the subscriber)."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def matching(self, pattern: str) -> list[re.Match[str]]:
        return [match for line in list(self.lines) if (match := re.search(pattern, line))]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def wheel_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The wheels tests/nspawn.py builds, served on the host's loopback: a fleet's wheel mirror (pip --find-links).
    The agent's own wheel is copied out first: the shared cache's is rebuilt by every session that builds wheels,
    and a changed wheel is (rightly) installed again by the next playbook run."""
    wheels = nspawn.build_wheels()
    agent_wheel = tmp_path_factory.mktemp("dist") / next(wheels.glob("donkey_edge_agent-*.whl")).name
    shutil.copy(wheels / agent_wheel.name, agent_wheel)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=wheels))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield agent_wheel, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """models/pilot.tflite packed and signed with a key made here (never stored): (bundle, public PEM, sha256)."""
    work = tmp_path_factory.mktemp("signing")
    key = ec.generate_private_key(ec.SECP256R1())
    private = work / "e2e-signing.key"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    bundle = work / "pilot-bundle"
    cli = str(BIN / "donkey-agent")
    packed = subprocess.run([cli, "model", "pack", str(bundle), "--model", str(REPO / "models" / "pilot.tflite"),
                             "--name", "pilot", "--version", "e2e.1"], capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0, packed.stdout + packed.stderr
    signed = subprocess.run([cli, "model", "sign", str(bundle), "--key", str(private)], capture_output=True,
                            text=True, timeout=120)
    assert signed.returncode == 0, signed.stdout + signed.stderr
    private.unlink()  # the car never needs it, and neither does anything after this
    sha256 = json.loads((bundle / "manifest.json").read_text())["model"]["sha256"]
    return bundle, public, sha256


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Container]:
    """A fresh Debian root (the cached debootstrap tarball), booted: nothing of the agent on it."""
    tarball = nspawn.ensure_root_tarball()
    root = tmp_path_factory.mktemp("provision") / "root"
    root.mkdir()
    with tarfile.open(tarball) as archive:
        archive.extractall(root, filter="fully_trusted")
    box = nspawn.Container(root)
    box.boot()
    yield box
    box.shutdown()
    shutil.rmtree(root, ignore_errors=True)


class Fleet:
    """The host side: the twin, the broker with mutual TLS, a fleet subscriber, and what they saw."""

    def __init__(self, directory: Path) -> None:
        self.pki = Pki(directory)
        self.broker, self.plain_port = secure_broker(directory, self.pki)
        self.car_cert, self.car_key = self.pki.issue(CAR)  # its CN is its MQTT user name (the ACL's %u)
        self.summary = directory / "twin-summary.json"
        self.twin = subprocess.Popen([str(BIN / "donkey-sim"), "serve", "--port", "0", "--track", "generated_track",
                                      "--summary", str(self.summary)], stderr=subprocess.PIPE, text=True)
        self.twin_log = Lines(self.twin.stderr)
        assert wait_for(lambda: bool(self.twin_log.matching(r"donkey-sim: listening on [\d.]+:\d+")), 30)
        self.twin_port = int(self.twin_log.matching(r"donkey-sim: listening on [\d.]+:(\d+)")[0].group(1))
        self.subscriber = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.plain_port), "-u", "fleet", "-P", "fleet-secret",
             "-t", f"donkey/{FLEET}/{CAR}/#", "-v"], stdout=subprocess.PIPE, text=True)
        self.messages = Lines(self.subscriber.stdout)

    def seen(self, channel: str) -> list[dict[str, Any]]:
        """The JSON payloads on donkey/<fleet>/<car>/<channel>, in order."""
        prefix = f"donkey/{FLEET}/{CAR}/{channel} "
        return [json.loads(line[len(prefix):]) for line in list(self.messages.lines) if line.startswith(prefix)]

    def cars(self) -> list[int]:
        """The twin's car numbers, one per connection (an agent start, or doctor's probe of the simulator)."""
        return [int(match.group(1)) for match in self.twin_log.matching(r"car (\d+) loaded on")]

    def laps(self, car: int) -> int:
        return len(self.twin_log.matching(rf": car {car} lap \d+ in"))

    def stop_twin(self) -> list[dict[str, Any]]:
        if self.twin.poll() is None:
            self.twin.send_signal(signal.SIGTERM)
            self.twin.wait(timeout=30)
        return json.loads(self.summary.read_text())["cars"] if self.summary.exists() else []

    def close(self) -> None:
        self.stop_twin()
        self.subscriber.terminate()
        self.subscriber.wait(timeout=10)
        self.broker.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    host = Fleet(tmp_path_factory.mktemp("fleet"))
    yield host
    host.close()


def inventory(path: Path, container: nspawn.Container, host: str, **variables: Any) -> Path:
    """A one-car inventory reaching the booted container through nsenter (JSON is YAML)."""
    path.write_text(json.dumps({"cars": {"hosts": {host: {
        "ansible_connection": "community.docker.nsenter",
        "ansible_nsenter_pid": container.pid1,  # the container's PID 1: its mount, network, PID... namespaces
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_become": False,  # nsenter is root already (become would try sudo)
        **variables,
    }}}}, indent=2))
    return path


def playbook(inventory_path: Path, facts: Path, *args: str, env: dict[str, str] | None = None,
             timeout: float = 900) -> tuple[subprocess.CompletedProcess[str], dict[str, int], float]:
    """ansible-playbook site.yml as a technician runs it (from ansible/, its ansible.cfg); the recap's counts."""
    environment = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
                   "ANSIBLE_CACHE_PLUGIN": "jsonfile", "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(facts),
                   "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    started = time.monotonic()
    result = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory_path), "site.yml", *args],
                            cwd=ANSIBLE, env=environment, capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - started
    recap = HOSTS.findall(result.stdout)
    counts = dict(zip(("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored"),
                      map(int, recap[-1][1:]), strict=True)) if recap else {}
    return result, counts, elapsed


def changed_tasks(output: str) -> list[str]:
    """The names of the tasks that reported changed, from the default callback's output."""
    names, current = [], ""
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            current = line[line.index("[") + 1:line.rindex("]")]
        elif line.startswith("changed:"):
            names.append(current)
    return names


def status(container: nspawn.Container) -> dict[str, str]:
    return container.show("donkey-agent", "ActiveState", "SubState", "StatusText", "NRestarts", "MainPID",
                          "MemoryHigh")


def drives_after(fleet: Fleet, mark: int) -> bool:
    """The fleet saw the car under way (telemetry throttle > 0.1) in the messages after the first ``mark``."""
    prefix = f"donkey/{FLEET}/{CAR}/telemetry "
    return any(json.loads(line[len(prefix):])["values"]["throttle"] > 0.1
               for line in list(fleet.messages.lines)[mark:] if line.startswith(prefix))


def reboot(container: nspawn.Container) -> None:
    """`systemctl reboot` in the container; systemd-nspawn exits (as under systemd-nspawn@.service, which starts
    it again: here the test does); then the same root boots again."""
    assert container.process is not None
    container.run("systemctl", "reboot", check=False)
    container.process.wait(timeout=60)
    container.boot()


def journal(container: nspawn.Container, since: str = "") -> str:
    return container.run("journalctl", "-u", "donkey-agent", "--no-pager", *(["--since", since] if since else []),
                         check=False).stdout


def test_provision_boot_drive_reboot_and_recover(container: nspawn.Container, fleet: Fleet,
                                                 wheel_mirror: tuple[Path, str], signed_bundle: tuple[Path, str, str],
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("ansible")
    facts = tmp_path_factory.getbasetemp() / "facts"
    agent_wheel, mirror = wheel_mirror
    bundle, public_key, model_sha256 = signed_bundle
    not_after = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    car_vars = {
        "donkey_fleet": FLEET,
        "donkey_agent_touch_kernel": False,  # a container: the host's kernel, no boot partition
        "donkey_agent_update_package_cache": False,  # the packages are there; the test installs nothing from Debian
        "donkey_agent_wheel": str(agent_wheel),
        "donkey_agent_pip_find_links": [mirror],
        "donkey_agent_pip_no_index": True,
        "donkey_agent_mqtt_url": f"mqtts://127.0.0.1:{fleet.broker.port}",
        "donkey_agent_mqtt_ca": fleet.pki.ca_path.read_text(),
        "donkey_agent_mqtt_cert": fleet.car_cert.read_text(),
        "donkey_agent_mqtt_key": fleet.car_key.read_text(),
        "donkey_agent_trusted_keys": [{"name": "e2e-signing", "pem": public_key, "not_after": not_after}],
        "donkey_agent_model_bundle": str(bundle),
        "donkey_agent_config": {"twin": {"port": fleet.twin_port}},
        "donkey_agent_unit_dropins": {"50-memory": {"Service": {"MemoryHigh": "350M"}}},
    }
    hosts = inventory(work / "hosts.yml", container, CAR, **car_vars)

    # 1. One run makes the fresh root a car.
    first, counts, converge_s = playbook(hosts, facts)
    print(first.stdout[-6000:])  # the technician's view, with the doctor's table (pytest -s)
    assert first.returncode == 0 and counts["failed"] == 0, first.stdout[-8000:] + first.stderr[-3000:]
    assert counts["changed"] > 10
    key_body = fleet.car_key.read_text().splitlines()[1]
    assert key_body not in first.stdout + first.stderr  # no_log: the car's private key is never in the log
    doctor = first.stdout[first.stdout.index("Show the doctor's table"):]
    assert re.search(r"\d+ checks: 0 failed", doctor), doctor[:3000]
    assert "PASS  simulator" in doctor and "PASS  autopilot model" in doctor

    # Ready (Type=notify: active only after READY=1), driving the signed model from the store, with the drop-in.
    state = status(container)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), journal(container)[-3000:]
    assert state["MemoryHigh"] == str(350 * 1024 * 1024)
    log = journal(container)
    assert "Started donkey-agent.service" in log
    assert "the staged bundle is the car's first model: made active at start" in log
    assert f"model: pilot e2e.1 (sha256 {model_sha256[:12]}" in log
    assert "UNSIGNED" not in log
    listed = json.loads(container.run(AGENT, "model", "list", "--json", "--config",
                                      "/etc/donkey-agent/agent.toml").stdout)
    assert listed["slots"]["active"]["sha256"] == model_sha256
    user = container.run("id", "donkey").stdout
    assert all(f"({group})" in user for group in ("i2c", "gpio", "video"))
    assert container.run("cat", "/etc/modules-load.d/donkey-agent.conf").stdout.split()[-1] == "i2c-dev"
    key_mode = container.run("stat", "-c", "%a %U %G", "/etc/donkey-agent/tls/car.key").stdout.split()
    assert key_mode == ["640", "root", "donkey"]

    # 2. It drives a full lap by itself and reports to the fleet.
    first_car = fleet.cars()[0]  # the agent's; doctor's probes of the simulator come later (a car each, briefly)
    assert wait_for(lambda: fleet.laps(first_car) >= 1, 90, interval=0.5), fleet.twin_log.lines[-20:]
    births = [message for message in fleet.seen("state") if message["state"] == "online"]
    assert births and births[0]["model_sha256"] == model_sha256
    telemetry = fleet.seen("telemetry")
    assert len(telemetry) > 20 and max(m["values"]["throttle"] for m in telemetry) > 0.1
    assert "started" in {event["kind"] for event in fleet.seen("events")}

    # 3. A second run changes nothing (and does not restart the car: the same twin car drives on).
    second, counts, idempotence_s = playbook(hosts, facts)
    assert second.returncode == 0, second.stdout[-6000:]
    assert counts["changed"] == 0, changed_tasks(second.stdout)
    assert status(container)["MainPID"] == state["MainPID"], journal(container)[-3000:]
    assert status(container)["NRestarts"] == "0"

    # 4. Reboot: the car comes back and drives with nobody touching it.
    mark = len(fleet.messages.lines)
    reboot(container)
    assert wait_for(lambda: drives_after(fleet, mark), 90, interval=0.3), journal(container)[-3000:]
    assert len([m for m in fleet.seen("state") if m["state"] == "online"]) >= 2
    time.sleep(2)

    # 5. `systemctl stop` while driving: neutral (the twin's last controls for this car, read at the end).
    assert container.run("systemctl", "stop", "donkey-agent", timeout=60).returncode == 0
    assert status(container)["ActiveState"] == "inactive"
    assert fleet.seen("state")[-1]["state"] == "offline"

    # 6. Started again after a clean stop, it drives; a stalled agent (SIGSTOP: no cycle, no ping) is killed by
    # the watchdog and restarted, and holds at neutral (it was driving when it stalled).
    mark = len(fleet.messages.lines)
    assert container.run("systemctl", "start", "donkey-agent", timeout=120).returncode == 0
    assert wait_for(lambda: drives_after(fleet, mark), 30, interval=0.3), journal(container)[-3000:]
    stalled = status(container)
    container.run("kill", "-STOP", stalled["MainPID"])
    assert wait_for(lambda: status(container)["NRestarts"] == str(int(stalled["NRestarts"]) + 1), 20, interval=0.3)
    assert wait_for(lambda: "unclean_exit" in status(container)["StatusText"], 60, interval=0.3)
    assert "Watchdog timeout" in journal(container)

    # 7. An e-stop (the technician's command) survives a restart.
    estop = container.run(AGENT, "estop", "--config", "/etc/donkey-agent/agent.toml")
    assert estop.returncode == 0, estop.stderr
    assert wait_for(lambda: "estop" in status(container)["StatusText"], 10, interval=0.3)
    assert container.run("systemctl", "restart", "donkey-agent", timeout=120).returncode == 0
    assert wait_for(lambda: "estop" in status(container)["StatusText"], 30, interval=0.3)
    assert "fault=estop, detail=latched before the restart" in journal(container)
    assert "estop" in {event["kind"] for event in fleet.seen("events")}
    time.sleep(2)  # held: it does not move
    assert container.run("systemctl", "stop", "donkey-agent", timeout=60).returncode == 0

    # The agent's cars (it names itself in car_config); doctor's probes of the simulator are cars too, unnamed.
    cars = [car for car in fleet.stop_twin() if car["car_name"] == "donkey-agent"]
    print(f"converge {converge_s:.1f} s, idempotent run {idempotence_s:.1f} s; twin cars: "
          + json.dumps([{k: car.get(k) for k in ("car", "laps", "distance_m", "off_track_events", "last_controls")}
                        for car in cars]))
    assert len(cars) == 5  # provisioned, after the reboot, after the stop, after the watchdog, after the e-stop
    provisioned, rebooted, restarted, after_watchdog, after_estop = cars
    assert provisioned["laps"] >= 1 and provisioned["off_track_events"] == 0
    assert provisioned["last_controls"] == [0.0, 0.0]  # the reboot stopped it cleanly
    assert rebooted["distance_m"] > 1.0 and rebooted["off_track_events"] == 0
    assert rebooted["last_controls"] == [0.0, 0.0]  # `systemctl stop`
    assert restarted["distance_m"] > 0.5 and restarted["off_track_events"] == 0
    for held in (after_watchdog, after_estop):  # held after the crash, then e-stopped: never moved
        assert held["distance_m"] < 0.05 and held["last_controls"] == [0.0, 0.0]


# -- the branches CI cannot apply, in check mode -------------------------------------------------------------

FEDORA_FACTS = {
    "ansible_os_family": "RedHat", "ansible_distribution": "Fedora", "ansible_distribution_version": "42",
    "ansible_distribution_major_version": "42", "ansible_distribution_release": "", "ansible_pkg_mgr": "dnf5",
    "ansible_architecture": "aarch64", "ansible_machine": "aarch64",
}
FEDORA_CONFIG_TXT = "# Fedora's /boot/efi/config.txt for a Raspberry Pi 4 (bcm2711-firmware)\narm_64bit=1\n"
PI_CONFIG_TXT = "# Raspberry Pi OS bookworm\ndtparam=audio=on\ncamera_auto_detect=1\n[all]\n"
PI_CMDLINE = "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes " \
             "rootwait ima_hash=sha1 quiet\n"
# Tasks that cannot run on a Debian target pretending to be Fedora, and only those: their failures are ignored in
# check mode (ignore_errors: "{{ ansible_check_mode }}") and listed here, so any other failure fails the test.
NEEDS_FEDORA = {"Install the OS packages", "Install the Keylime agent", "Enable and start the Keylime agent",
                "Read the kernels' arguments", "Restart the Keylime agent"}
# What check mode must not write (the container's own files stay as the test laid them).
UNTOUCHED = ("etc/keylime", "etc/ima", "etc/u-boot.conf")


def task_results(output: dict[str, Any], host: str) -> dict[str, dict[str, Any]]:
    """ansible.posix.json's output: each task's name -> its result for ``host`` (the last one with that name)."""
    results = {}
    for play in output["plays"]:
        for task in play["tasks"]:
            if host in task["hosts"]:
                results[task["task"]["name"].split(" : ", 1)[-1]] = task["hosts"][host]  # without "role : "
    return results


def check_mode(container: nspawn.Container, wheel_mirror: tuple[Path, str], signed_bundle: tuple[Path, str, str],
               tmp_path_factory: pytest.TempPathFactory, host: str, facts_override: dict[str, str],
               **variables: Any) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """site.yml --check --diff on the provisioned container as ``host``, with its facts from a fact cache: the
    container's own (gathered by the first test), overridden by ``facts_override``; each task's result, and the
    recap's counts."""
    facts = tmp_path_factory.getbasetemp() / "facts"
    # ansible-core 2.19's jsonfile cache: a file per host, "s1_<host>" (schema 1), the facts as a JSON payload.
    gathered = sorted(facts.glob(f"*{CAR}"))
    if not gathered:
        pytest.fail("needs the facts gathered by test_provision_boot_drive_reboot_and_recover (run the module)")
    wrapper = json.loads(gathered[0].read_text())
    wrapper["__payload__"] = json.dumps({**json.loads(wrapper["__payload__"]), **facts_override})
    gathered[0].with_name(gathered[0].name.replace(CAR, host)).write_text(json.dumps(wrapper))
    agent_wheel, mirror = wheel_mirror
    bundle, public_key, _ = signed_bundle
    hosts = inventory(tmp_path_factory.mktemp("check") / "hosts.yml", container, host, **{
        "donkey_fleet": FLEET, "donkey_agent_car_id": CAR, "donkey_agent_wheel": str(agent_wheel),
        "donkey_agent_pip_find_links": [mirror], "donkey_agent_pip_no_index": True,
        "donkey_agent_trusted_keys": [{"name": "e2e-signing", "pem": public_key}],
        "donkey_agent_model_bundle": str(bundle), "donkey_agent_update_package_cache": False,
        "donkey_agent_touch_kernel": True, "donkey_agent_tpm": True,
        "donkey_agent_modprobe": False,  # CI's kernel has no loadable modules (no /proc/modules in the container)
        "ima_enabled": True, **variables,
    })
    result, _, elapsed = playbook(hosts, facts, "--check", "--diff",
                                  env={"ANSIBLE_GATHERING": "smart", "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"})
    assert "\n{\n" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    # The JSON document, between profile_tasks' lines (ansible.cfg enables it for the technician's view).
    output, _ = json.JSONDecoder().raw_decode(result.stdout[result.stdout.index("\n{\n") + 1:])
    tasks = task_results(output, host)
    print(f"{host} in check mode: {elapsed:.1f} s, {len(tasks)} tasks")
    for path in UNTOUCHED:
        assert not (container.root / path).exists(), path
    return tasks, output["stats"][host]


def after(tasks: dict[str, dict[str, Any]], name: str) -> list[str]:
    """The lines a task would have written (its --diff's "after")."""
    diff = tasks[name]["diff"]
    return "".join(part.get("after", "") for part in (diff if isinstance(diff, list) else [diff])).splitlines()


def failed(tasks: dict[str, dict[str, Any]]) -> set[str]:
    return {name for name, task in tasks.items() if task.get("failed")}


def test_fedora_branches_in_check_mode(container: nspawn.Container, fleet: Fleet, wheel_mirror: tuple[Path, str],
                                       signed_bundle: tuple[Path, str, str],
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fedora 42 on aarch64: keylime-agent-rust with the car's UUID, IMA by grubby, /boot/efi/config.txt and
    U-Boot's FirmwareDT; nothing written. With no simulator, doctor's FAIL row stops the play after its table."""
    fleet.stop_twin()  # the doctor then finds no simulator: a FAIL row, which stops the play (the default)
    config_txt = container.root / "boot" / "efi" / "config.txt"
    config_txt.parent.mkdir(parents=True, exist_ok=True)
    config_txt.write_text(FEDORA_CONFIG_TXT)
    tasks, recap = check_mode(container, wheel_mirror, signed_bundle, tmp_path_factory, "car-fedora", FEDORA_FACTS,
                              keylime_agent_enabled=True, keylime_agent_registrar_ip="192.0.2.10",
                              keylime_agent_contact_ip="192.0.2.77")
    # Only Fedora's own tools failed (ignored in check mode: every one of them, or the play would have stopped
    # there), and then the doctor's FAIL row: the table is shown, then the play stops for this car.
    unexpected = failed(tasks) - NEEDS_FEDORA
    assert unexpected == {"Stop here when a check failed"}, {name: tasks[name].get("msg") for name in unexpected}
    assert recap["ignored"] == len(failed(tasks) & NEEDS_FEDORA) and recap["failures"] == 1
    assert "FAIL  simulator" in "\n".join(tasks["Show the doctor's table"]["msg"])
    assert tasks["Install the OS packages"]["invocation"]["module_args"]["name"][:2] == ["python3.11", "util-linux"]
    expected_uuid = str(uuid.uuid5(uuid.UUID("361E6D51-FAEC-444A-9079-341386DA8E2E"), f"{FLEET}/car-fedora"))
    keylime = after(tasks, "Configure the Keylime agent (the car's UUID, the registrar)")
    assert {f'uuid = "{expected_uuid}"', 'registrar_ip = "192.0.2.10"', 'contact_ip = "192.0.2.77"'} <= set(keylime)
    uid = container.run("id", "-u", "donkey").stdout.strip()
    rule = f"measure func=FILE_CHECK mask=^MAY_READ uid={uid} template=ima-sig"
    assert rule in after(tasks, "Install the IMA policy")
    assert after(tasks, "Enable I2C, the camera and the TPM in config.txt") == [
        *FEDORA_CONFIG_TXT.splitlines(), "# BEGIN donkey-agent (Ansible)", "[all]", "dtparam=i2c_arm=on",
        "dtparam=spi=on", "dtoverlay=tpm-slb9670", "# END donkey-agent (Ansible)"]  # no CSI camera on Fedora
    assert after(tasks, "Let U-Boot pass the firmware's device tree (Fedora)") == ["FirmwareDT=True"]
    grubby = tasks["Add the IMA arguments to every kernel"]
    assert grubby.get("skipped") and "would have run" in grubby["msg"]  # a command: check mode does not run it
    assert tasks["Write cmdline.txt with the IMA arguments"].get("skipped")  # Pi OS only
    assert config_txt.read_text() == FEDORA_CONFIG_TXT  # check mode wrote nothing


def test_raspberry_pi_os_boot_branches_in_check_mode(container: nspawn.Container, fleet: Fleet,
                                                     wheel_mirror: tuple[Path, str],
                                                     signed_bundle: tuple[Path, str, str],
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    """Raspberry Pi OS (the container's own Debian facts): /boot/firmware/config.txt with the camera, and the IMA
    arguments in cmdline.txt, replacing an earlier value of theirs and keeping every other argument in order."""
    fleet.stop_twin()
    firmware = container.root / "boot" / "firmware"
    firmware.mkdir(parents=True, exist_ok=True)
    (firmware / "config.txt").write_text(PI_CONFIG_TXT)
    (firmware / "cmdline.txt").write_text(PI_CMDLINE)
    tasks, recap = check_mode(container, wheel_mirror, signed_bundle, tmp_path_factory, "car-pi", {},
                              donkey_agent_doctor_fail_on_fail=False)  # no simulator: a FAIL row, the play goes on
    assert failed(tasks) == set() and recap["ignored"] == 0, {name: tasks[name].get("msg") for name in failed(tasks)}
    assert "FAIL  simulator" in "\n".join(tasks["Show the doctor's table"]["msg"])
    assert after(tasks, "Enable I2C, the camera and the TPM in config.txt") == [
        *PI_CONFIG_TXT.splitlines(), "# BEGIN donkey-agent (Ansible)", "[all]", "dtparam=i2c_arm=on",
        "camera_auto_detect=1", "dtparam=spi=on", "dtoverlay=tpm-slb9670", "# END donkey-agent (Ansible)"]
    assert after(tasks, "Write cmdline.txt with the IMA arguments") == [
        "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait "
        "quiet ima_policy=tcb ima_template=ima-ng ima_hash=sha256"]
    assert tasks["Let U-Boot pass the firmware's device tree (Fedora)"].get("skipped")
    assert tasks["Reboot for IMA"].get("changed") and tasks["Reboot for the boot configuration"].get("changed")
    assert (firmware / "cmdline.txt").read_text() == PI_CMDLINE  # check mode wrote nothing
    assert (firmware / "config.txt").read_text() == PI_CONFIG_TXT
