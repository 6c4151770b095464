"""A fake I2C bus with a PCA9685 register file: the hardware boundary, emulated.

It implements the busio.I2C calls that adafruit_bus_device makes (try_lock, unlock, writeto,
readfrom_into, writeto_then_readfrom) and keeps the chip's 256 registers, with register
auto-increment. Tests read the registers back to check the exact values written.
"""

from __future__ import annotations


class FakePca9685Bus:
    def __init__(self, address: int = 0x40) -> None:
        self.address = address
        self.registers = bytearray(256)
        self.registers[0x00] = 0x11  # MODE1 power-on default (sleep, ALLCALL)
        self.registers[0xFE] = 0x1E  # PRESCALE power-on default (200 Hz)
        self.writes: list[tuple[int, bytes]] = []  # (first register, data) in order
        self.fail_next = 0  # raise OSError(EIO) on this many following transfers
        self.fail_led_writes = 0  # ...or only on this many following writes to the LED (PWM) registers
        self._locked = False

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
        if payload and 0x06 <= register <= 0x45 and self.fail_led_writes:
            self.fail_led_writes -= 1
            raise OSError(5, "Input/output error")
        for offset, value in enumerate(payload):
            self.registers[(register + offset) & 0xFF] = value
        if payload:
            self.writes.append((register, payload))
        self._pointer = register

    def readfrom_into(self, address: int, buffer: bytearray, *, start: int = 0, end: int | None = None) -> None:
        self._check(address)
        end = len(buffer) if end is None else end
        pointer = getattr(self, "_pointer", 0)
        for i in range(start, end):
            buffer[i] = self.registers[(pointer + i - start) & 0xFF]

    def writeto_then_readfrom(self, address: int, out_buffer: bytes, in_buffer: bytearray, *, out_start: int = 0,
                              out_end: int | None = None, in_start: int = 0, in_end: int | None = None) -> None:
        self._check(address)
        self._pointer = out_buffer[out_start]
        self.readfrom_into(address, in_buffer, start=in_start, end=in_end)

    # -- inspection ------------------------------------------------------------------------------
    def channel(self, index: int) -> tuple[int, int]:
        """(ON, OFF) 13-bit register values of a channel (bit 12 = full on / full off)."""
        base = 0x06 + 4 * index
        r = self.registers
        return r[base] | (r[base + 1] << 8), r[base + 2] | (r[base + 3] << 8)

    @property
    def prescale(self) -> int:
        return self.registers[0xFE]
