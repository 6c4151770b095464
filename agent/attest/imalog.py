"""The kernel's IMA measurement list in its ASCII form (``ascii_runtime_measurements``), for ``ima-ng``/``ima-sig``.

Why here: the self-check reads the first entry (it must be ``boot_aggregate``) and the tests build synthetic logs
that Keylime's own validator must accept byte for byte. Template data, as the kernel hashes it (reference §6):

    d-ng:  u32le length | "<algo>" ":" "\\0" | digest
    n-ng:  u32le length | path "\\0"
    sig:   u32le length | security.ima bytes          (ima-sig only; length 0 when the file is unsigned)

Column 2 of a line is SHA-1 over that template data; the sha256 bank of PCR 10 is extended with SHA-256 of it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from agent.errors import AgentError

IMA_PCR = 10
TEMPLATES = ("ima-ng", "ima-sig")


class ImaLogError(AgentError, ValueError):
    """A line that is not an ``ima-ng``/``ima-sig`` measurement as the kernel writes it."""


def _field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def template_data(digest: bytes, path: str, *, algo: str = "sha256", template: str = "ima-ng",
                  signature: bytes = b"") -> bytes:
    """The bytes the kernel hashes for one entry (``ima-ng``: d-ng | n-ng; ``ima-sig``: d-ng | n-ng | sig)."""
    if template not in TEMPLATES:
        raise ImaLogError(f"template {template!r}: only {', '.join(TEMPLATES)} are built here")
    data = _field(algo.encode() + b":\0" + digest) + _field(path.encode() + b"\0")
    if template == "ima-sig":
        data += _field(signature)
    return data


@dataclass(frozen=True)
class Entry:
    """One measurement: what the line says and the template hash recomputed from it."""

    pcr: int
    template_hash: str  # column 2, hex (SHA-1 of the template data)
    template: str
    algo: str
    digest: bytes
    path: str
    signature: bytes = b""

    def data(self) -> bytes:
        return template_data(self.digest, self.path, algo=self.algo, template=self.template,
                             signature=self.signature)

    def line(self) -> str:
        sig = f" {self.signature.hex()}" if self.template == "ima-sig" else ""
        return f"{self.pcr} {self.template_hash} {self.template} {self.algo}:{self.digest.hex()} {self.path}{sig}"

    @property
    def consistent(self) -> bool:
        """Whether column 2 is the SHA-1 of the template data (a tampered or mistyped line is not)."""
        return hashlib.sha1(self.data()).hexdigest() == self.template_hash


def entry(digest: bytes, path: str, *, algo: str = "sha256", template: str = "ima-ng", signature: bytes = b"",
          pcr: int = IMA_PCR) -> Entry:
    """A well-formed entry for ``path`` with ``digest``, its template hash computed as the kernel does."""
    data = template_data(digest, path, algo=algo, template=template, signature=signature)
    return Entry(pcr, hashlib.sha1(data).hexdigest(), template, algo, digest, path, signature)


def boot_aggregate(digest: bytes = bytes(32), *, template: str = "ima-ng") -> Entry:
    """The first entry of every list; all zeros when IMA found no TPM (TPM-bypass)."""
    return entry(digest, "boot_aggregate", template=template)


def parse_line(line: str) -> Entry:
    """Parse one ASCII line. Paths with spaces are kept whole (``ima-ng``); ``ima-sig`` ends in a hex field."""
    parts = line.rstrip("\n").split(" ")
    if len(parts) < 5:
        raise ImaLogError(f"expected 'PCR template-hash template algo:digest path', got {line!r}")
    pcr_text, template_hash, template, digest_field = parts[:4]
    if template not in TEMPLATES:
        raise ImaLogError(f"template {template!r} is not read here (only {', '.join(TEMPLATES)})")
    rest = parts[4:]
    signature = b""
    if template == "ima-sig":
        if len(rest) < 2:
            raise ImaLogError(f"ima-sig line without its signature field: {line!r}")
        *rest, sig_hex = rest
        try:
            signature = bytes.fromhex(sig_hex)
        except ValueError:
            raise ImaLogError(f"ima-sig signature is not hex: {sig_hex!r}") from None
    algo, sep, digest_hex = digest_field.partition(":")
    try:
        pcr = int(pcr_text)
        digest = bytes.fromhex(digest_hex)
    except ValueError:
        raise ImaLogError(f"bad PCR or digest in {line!r}") from None
    if not sep or not algo or len(template_hash) != 40:
        raise ImaLogError(f"bad digest field or template hash in {line!r}")
    return Entry(pcr, template_hash.lower(), template, algo, digest, " ".join(rest), signature)


def extend(pcr_value: bytes, entries: list[Entry]) -> bytes:
    """PCR 10 (sha256 bank) after extending ``pcr_value`` with each entry's SHA-256 template hash."""
    for item in entries:
        pcr_value = hashlib.sha256(pcr_value + hashlib.sha256(item.data()).digest()).digest()
    return pcr_value
