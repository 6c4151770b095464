"""A fake I2C bus with a PCA9685 register file: the hardware boundary, emulated.

It implements the busio.I2C calls that adafruit_bus_device makes (try_lock, unlock, writeto,
readfrom_into, writeto_then_readfrom) and keeps the chip's 256 registers, with register
auto-increment. Tests read the registers back to check the exact values written.

Self-contained on purpose (standard library only): tests/test_systemd_real.py copies this file,
with tests/fakes/extended_bus.py, into a container's venv as the fake ``adafruit_extended_bus``.
"""

from __future__ import annotations

import mmap

LED0 = 0x06  # LED0_ON_L: channel n's ON_L, ON_H, OFF_L, OFF_H are at LED0 + 4n ...
LED_LAST = 0x45  # ... up to channel 15's OFF_H


def power_on_registers() -> bytearray:
    """The register file of a PCA9685 that just got power: asleep, 200 Hz, every channel at 0."""
    registers = bytearray(256)
    registers[0x00] = 0x11  # MODE1 power-on default (sleep, ALLCALL)
    registers[0xFE] = 0x1E  # PRESCALE power-on default (200 Hz)
    return registers


def channels_touched(register: int, length: int) -> set[int]:
    """The LED channels whose registers a write of ``length`` bytes from ``register`` changes."""
    last = min(register + length - 1, LED_LAST)
    return {(r - LED0) // 4 for r in range(max(register, LED0), last + 1)}


def channel_of(registers: bytes | bytearray | mmap.mmap, index: int) -> tuple[int, int]:
    """(ON, OFF) 13-bit register values of a channel (bit 12 = full on / full off)."""
    base = LED0 + 4 * index
    on, off = registers[base] | (registers[base + 1] << 8), registers[base + 2] | (registers[base + 3] << 8)
    return on, off


class FakePca9685Bus:
    def __init__(self, address: int = 0x40, registers: bytearray | mmap.mmap | None = None) -> None:
        self.address = address
        # A bytearray by default; a file-backed mmap makes the chip outlive the process (extended_bus.py).
        self.registers = power_on_registers() if registers is None else registers
        self.writes: list[tuple[int, bytes]] = []  # (first register, data) in order
        self.fail_next = 0  # raise OSError(EIO) on this many following transfers
        self.fail_led_writes = 0  # ...or only on this many following writes to the LED (PWM) registers
        # ...or only on writes to these channels' registers: channel -> how many more to fail
        self.fail_channel_writes: dict[int, int] = {}
        self._locked = False
        self._pointer = 0

    def fail_channel(self, index: int, times: int = 1_000_000) -> None:
        """Fail the next ``times`` writes that touch channel ``index`` (EIO, nothing written)."""
        self.fail_channel_writes[index] = times

    # -- busio.I2C API -------------------------------------------------------------------------
    def try_lock(self) -> bool:
        if self._locked:
            return False
        self._locked = True
        return True

    def unlock(self) -> None:
        self._locked = False

    def _check(self, address: int) -> None:
        if address != self.address:
            raise OSError(121, "Remote I/O error")  # no ACK, as a real bus reports a missing device
        if self.fail_next:
            self.fail_next -= 1
            raise OSError(5, "Input/output error")

    def writeto(self, address: int, buffer: bytes, *, start: int = 0, end: int | None = None) -> None:
        self._check(address)
        data = bytes(buffer[start:end])
        if not data:
            return  # a probe
        register, payload = data[0], data[1:]
        if payload and LED0 <= register <= LED_LAST and self.fail_led_writes:
            self.fail_led_writes -= 1
            raise OSError(5, "Input/output error")
        self._fail_per_channel(register, len(payload))
        for offset, value in enumerate(payload):
            self.registers[(register + offset) & 0xFF] = value
        if payload:
            self.record(register, payload)
        self._pointer = register

    def _fail_per_channel(self, register: int, length: int) -> None:
        """EIO, before anything is written, when the write touches a channel set to fail."""
        for index in sorted(channels_touched(register, length)):
            if self.fail_channel_writes.get(index, 0) > 0:
                self.fail_channel_writes[index] -= 1
                raise OSError(5, "Input/output error")

    def record(self, register: int, payload: bytes) -> None:
        """Keep a register write that landed (the file-backed bus also appends it to its log)."""
        self.writes.append((register, payload))

    def readfrom_into(self, address: int, buffer: bytearray, *, start: int = 0, end: int | None = None) -> None:
        self._check(address)
        end = len(buffer) if end is None else end
        for i in range(start, end):
            buffer[i] = self.registers[(self._pointer + i - start) & 0xFF]

    def writeto_then_readfrom(self, address: int, out_buffer: bytes, in_buffer: bytearray, *, out_start: int = 0,
                              out_end: int | None = None, in_start: int = 0, in_end: int | None = None) -> None:
        self._check(address)
        self._pointer = out_buffer[out_start]
        self.readfrom_into(address, in_buffer, start=in_start, end=in_end)

    # -- inspection ------------------------------------------------------------------------------
    def channel(self, index: int) -> tuple[int, int]:
        """(ON, OFF) 13-bit register values of a channel (bit 12 = full on / full off)."""
        return channel_of(self.registers, index)

    def led_writes(self) -> list[tuple[int, int]]:
        """(channel, OFF count) of every PWM register write that landed, in order."""
        return [(index, channel_of(self.registers_after(register, payload), index)[1])
                for register, payload in self.writes for index in sorted(channels_touched(register, len(payload)))]

    @staticmethod
    def registers_after(register: int, payload: bytes) -> bytearray:
        """A scratch register file holding just this one write (to decode the channel values it set)."""
        scratch = bytearray(256)
        for offset, value in enumerate(payload):
            scratch[(register + offset) & 0xFF] = value
        return scratch

    @property
    def prescale(self) -> int:
        return self.registers[0xFE]
