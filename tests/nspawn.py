"""A real systemd for tests: a debootstrap'ed Debian root booted with systemd-nspawn.

The root is built once (about a minute, from Debian's archive) and cached as a tarball in
DONKEY_TEST_CACHE (default /var/cache/donkey-agent-tests), so later runs unpack it in seconds.
The agent is installed from wheels built on the host (same Python ABI, cp311) into
/opt/donkey-agent/venv, exactly where the unit expects it, with the ``pi`` extra as on a car
(the real adafruit-circuitpython-pca9685 driver and Blinka): the container has no network, so
every wheel it installs is built or downloaded on the host first.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("DONKEY_TEST_CACHE", "/var/cache/donkey-agent-tests"))
# python3-apt and kmod: what the Ansible role needs on a Debian target (apt facts and packages, modprobe), as on
# Raspberry Pi OS; the container has the host's network but the tests install nothing from Debian into it.
PACKAGES = "python3,python3-venv,python3-apt,kmod,systemd,systemd-sysv,dbus,procps,passwd"
# The package list is part of the name, so a changed list never reuses a stale root.
ROOT_TAR = CACHE / f"bookworm-root-{hashlib.sha256(PACKAGES.encode()).hexdigest()[:12]}.tar"
MIRROR = "http://deb.debian.org/debian"
REPO = Path(__file__).resolve().parent.parent
EXTRAS = "pi"  # what a car installs: the container runs the PCA9685 driver (over an emulated bus)


def available() -> str:
    """Why a booted container cannot be used here, or "" when it can."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (./dev.sh test installs debootstrap and systemd-container as root)"
    return ""


def ensure_root_tarball() -> Path:
    if ROOT_TAR.exists():
        return ROOT_TAR
    CACHE.mkdir(parents=True, exist_ok=True)
    build = CACHE / "root-build"
    shutil.rmtree(build, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(build), MIRROR],
                   check=True, capture_output=True, timeout=900)
    partial = ROOT_TAR.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(build), "-cf", str(partial), "."], check=True, timeout=300)
    partial.replace(ROOT_TAR)
    shutil.rmtree(build, ignore_errors=True)
    return ROOT_TAR


@functools.cache  # once per test session: the systemd and the provisioning tests share them
def build_wheels() -> Path:
    """The agent's wheel and every dependency's, extras included, for an offline install in the container."""
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("donkey_edge_agent-*"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), f"{REPO}[{EXTRAS}]"],
                   check=True, capture_output=True, timeout=900)
    return wheels


class Container:
    """A booted container; ``run`` executes inside it through nsenter."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def install_agent(self, wheels: Path) -> None:
        target = self.root / "opt" / "wheels"
        shutil.copytree(wheels, target)
        chroot = ["chroot", str(self.root)]
        subprocess.run([*chroot, "python3", "-m", "venv", "/opt/donkey-agent/venv"], check=True, timeout=300)
        subprocess.run([*chroot, "/opt/donkey-agent/venv/bin/pip", "install", "-q", "--no-index", "--find-links",
                        "/opt/wheels", f"donkey-edge-agent[{EXTRAS}]"], check=True, capture_output=True, timeout=600)
        for group in ("i2c", "gpio", "video"):
            subprocess.run([*chroot, "groupadd", "-f", group], check=True)
        subprocess.run([*chroot, "useradd", "--system", "--no-create-home", "--user-group", "donkey"], check=True)

    def site_packages(self) -> Path:
        """The agent venv's site-packages, as a host path (to drop test doubles into)."""
        return next((self.root / "opt" / "donkey-agent" / "venv" / "lib").glob("python3*/site-packages"))

    def boot(self, timeout: float = 60) -> None:
        self.process = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit", "--console=pipe", "-b"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            if children.exists() and children.read_text().split():
                self.pid1 = int(children.read_text().split()[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise RuntimeError("the container did not boot")

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *command], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def shutdown(self) -> None:
        if self.process is None:
            return
        if self.pid1:
            self.run("systemctl", "poweroff", check=False)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
