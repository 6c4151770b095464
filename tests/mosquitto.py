"""A real mosquitto broker per test, on a free port, with a generated config."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available() -> str:
    missing = [tool for tool in ("mosquitto", "mosquitto_sub") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (./dev.sh test installs Debian's mosquitto)" if missing else ""


class Broker:
    def __init__(self, directory: Path, port: int | None = None, *, secure: list[str] | None = None) -> None:
        """A plain anonymous broker, or with ``secure`` the config lines of a locked-down one."""
        self.directory = directory
        self.port = port or free_port()
        self.config = directory / f"mosquitto-{self.port}.conf"
        lines = secure or [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        lines += ["persistence false", "log_dest stdout"]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto' and cannot read a root-owned temp dir
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        self.process = subprocess.Popen([shutil.which("mosquitto") or "mosquitto", "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)

    def subscribe(self, topic: str, *extra: str) -> subprocess.Popen[str]:
        """An independent client: mosquitto_sub printing 'topic payload' lines."""
        return subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.port), "-t", topic, "-v",
                                 *extra], stdout=subprocess.PIPE, text=True)


def collect(process: subprocess.Popen[str]) -> list[tuple[str, str]]:
    """Stop a subscriber and return its (topic, payload) lines."""
    process.terminate()
    out, _ = process.communicate(timeout=5)
    return [tuple(line.split(" ", 1)) for line in out.splitlines() if " " in line]  # type: ignore[misc]
