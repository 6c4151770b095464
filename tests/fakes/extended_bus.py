"""A stand-in for the ``adafruit_extended_bus`` package: a PCA9685 emulated in a file.

``ExtendedI2C(bus)``, the call ``Pca9685Actuators.open`` makes first, returns a FakePca9685Bus
whose 256 registers are an mmap of ``<directory>/fake-i2c-<bus>.regs``. Like a real chip's, the
registers outlive the process that wrote them: ``donkey-agent safe-stop`` (a new process, after
the agent was SIGKILLed) finds what the agent left, and a test on the host reads them through
the container's root directory. Every register write that lands is also appended to
``fake-i2c-<bus>.log`` as ``<pid> <command> <first register> <data>`` (hex), so a test can tell
which process wrote what, and in which order, even when a later process has overwritten it.

tests/test_systemd_real.py installs this file as ``adafruit_extended_bus/__init__.py`` and
tests/fakes/i2c.py beside it as ``i2c.py`` in the container's venv: standard library only.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path
from typing import NamedTuple

from .i2c import FakePca9685Bus, channel_of, channels_touched, power_on_registers

# The unit's StateDirectory=: writable by the agent's user under ProtectSystem=strict as shipped.
DIRECTORY = Path("/var/lib/donkey-agent")
ADDRESS = 0x40
SIZE = 256


def register_file(directory: Path, bus_id: int) -> Path:
    return directory / f"fake-i2c-{bus_id}.regs"


def log_file(directory: Path, bus_id: int) -> Path:
    return directory / f"fake-i2c-{bus_id}.log"


def open_registers(path: Path) -> mmap.mmap:
    """Map the register file, first creating it at power-on state if there is none.

    Created beside and linked into place, so a racing opener never maps a half-written file.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_bytes(power_on_registers())
        try:
            os.link(scratch, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            scratch.unlink()
        fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, SIZE)
    finally:
        os.close(fd)


def _command() -> str:
    """``run`` or ``safe-stop`` for ``donkey-agent run|safe-stop ...``: who wrote, in the log."""
    return sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else Path(sys.argv[0]).name


class ExtendedI2C(FakePca9685Bus):
    """``adafruit_extended_bus.ExtendedI2C(bus_id)``: here, a PCA9685 at 0x40 backed by a file."""

    def __init__(self, bus_id: int, frequency: int = 400_000, *, directory: Path = DIRECTORY,
                 address: int = ADDRESS) -> None:
        self.bus_id = bus_id
        self.frequency = frequency
        self._map = open_registers(register_file(directory, bus_id))
        super().__init__(address, self._map)
        self.command = _command()
        self._log = os.open(log_file(directory, bus_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(self, register: int, payload: bytes) -> None:
        """One ``write`` per line on an O_APPEND file: lines of concurrent writers never interleave."""
        super().record(register, payload)
        os.write(self._log, f"{os.getpid()} {self.command} {register:02x} {payload.hex()}\n".encode())

    def deinit(self) -> None:
        self._map.close()
        os.close(self._log)


class LoggedWrite(NamedTuple):
    """One register write from the log: which process, which command, what landed."""

    pid: int
    command: str
    register: int
    data: bytes

    def led(self) -> list[tuple[int, int]]:
        """(channel, OFF count) for each PWM channel this write set."""
        return [(index, channel_of(FakePca9685Bus.registers_after(self.register, self.data), index)[1])
                for index in sorted(channels_touched(self.register, len(self.data)))]


def read_log(directory: Path, bus_id: int = 1) -> list[LoggedWrite]:
    """Every logged write, in order (an empty list before the first)."""
    path = log_file(directory, bus_id)
    if not path.exists():
        return []
    writes = []
    for line in path.read_text().splitlines():
        pid, command, register, data = line.split()
        writes.append(LoggedWrite(int(pid), command, int(register, 16), bytes.fromhex(data)))
    return writes


def read_channel(directory: Path, index: int, bus_id: int = 1) -> tuple[int, int]:
    """(ON, OFF) of a channel as the register file holds it now; (0, 0) before the file exists."""
    path = register_file(directory, bus_id)
    return channel_of(path.read_bytes(), index) if path.exists() else (0, 0)
