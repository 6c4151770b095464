"""The car's trust store: which public keys and CA certificates may sign its models, and until when.

A directory (``models.trust_dir``, default ``/etc/donkey-agent/trusted-keys/``) of PEM files, one
entry each, several at once so keys can be rotated:

- ``NAME.pem`` (or ``.pub``, ``.crt``): an ECDSA public key (``BEGIN PUBLIC KEY``) for key-signed
  bundles, or a CA certificate (``BEGIN CERTIFICATE``) for certificate-signed ones.
- ``NAME.toml`` beside it (optional): ``not_after = 2027-06-01T00:00:00Z``, after which the entry
  no longer signs for this car (TOML datetime with a time zone). A CA certificate's own notAfter
  applies as well, whichever is earlier.

A bundle verifies if any unexpired entry verifies it; if only an expired one does, the refusal says
which key and when it expired. A broken entry (not PEM, a private key, an unsupported curve, a bad
sidecar) is reported in ``problems`` and skipped: one bad file must not lock a fleet out during a
rotation. The car never needs a private key; a trust store holding one is told so.
"""

from __future__ import annotations

import datetime
import hashlib
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.bundle import signing
from agent.bundle.errors import SignatureError, TrustStoreError

DEFAULT_TRUST_DIR = Path("/etc/donkey-agent/trusted-keys")
ENTRY_SUFFIXES = (".pem", ".pub", ".crt")
SIDECAR_KEYS = {"not_after", "note"}


@dataclass(frozen=True)
class TrustEntry:
    """One trusted key or CA certificate."""

    name: str  # the file's stem: how events and the CLI name the key
    path: Path
    kind: Literal["key", "ca"]
    key_id: str  # keys: the id model.sig records (sha256 of the SubjectPublicKeyInfo PEM); CAs: sha256 of the DER
    not_after: datetime.datetime | None  # None: no expiry
    note: str | None = None

    def expired(self, now: datetime.datetime) -> bool:
        return self.not_after is not None and now >= self.not_after

    def describe(self) -> str:
        until = f", until {_iso(self.not_after)}" if self.not_after else ""
        return f"{self.name} ({'key' if self.kind == 'key' else 'CA'} {self.key_id[:16]}{until})"


@dataclass(frozen=True)
class TrustedSignature:
    """A bundle's signature, verified, and the trust entry that verified it."""

    entry: TrustEntry
    verified: signing.Verified

    @property
    def signer_id(self) -> str:
        return self.verified.signer_id


@dataclass
class TrustStore:
    entries: list[TrustEntry]
    source: str
    problems: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, directory: Path) -> TrustStore:
        """Every usable entry in ``directory``; unusable ones go to ``problems`` with the reason."""
        if not directory.is_dir():
            return cls([], str(directory), [f"{directory}: no such directory (no trusted keys)"])
        entries, problems = [], []
        files = sorted(directory.iterdir())
        stems = {path.stem for path in files if path.suffix in ENTRY_SUFFIXES}
        for path in files:
            if path.suffix == ".toml":
                if path.stem not in stems:
                    problems.append(f"{path}: a not_after sidecar without {path.stem}.pem (or .pub, .crt)")
                continue
            if path.suffix not in ENTRY_SUFFIXES or path.name.startswith("."):
                continue
            try:
                entries.extend(_load_entry(path, path.with_suffix(".toml")))
            except TrustStoreError as exc:
                problems.append(str(exc))
        return cls(entries, str(directory), problems)

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> TrustStore:
        """A store of explicitly named keys or CA certificates (``model verify --key``): no sidecars, no expiry."""
        entries: list[TrustEntry] = []
        paths = list(paths)
        for path in paths:
            entries.extend(_load_entry(path, None))
        return cls(entries, ", ".join(str(path) for path in paths))

    def identify(self, bundle: Path, *, now: datetime.datetime | None = None) -> TrustedSignature:
        """Which entry's signature this is, verified; unexpired entries are tried first, expired ones after.

        Raises SignatureError (unsigned, malformed, tampered, untrusted). An expired signer is returned:
        ``check_validity`` refuses it, so the two causes stay apart.
        """
        now = now or utc_now()
        info = signing.read_signature(bundle)
        kind = "key" if info.method == "key" else "ca"
        candidates = [entry for entry in self.entries if entry.kind == kind]
        if kind == "key" and info.key_hint:
            candidates = [entry for entry in candidates if entry.key_id == info.key_hint]
        candidates.sort(key=lambda entry: entry.expired(now))
        if not candidates:
            raise SignatureError(self._untrusted(bundle, info), "untrusted")
        failures = []
        for entry in candidates:
            try:
                if entry.kind == "key":
                    verified = signing.verify_with_key(bundle, entry.path)
                else:
                    verified = signing.verify_with_certificates(bundle, [entry.path])
            except SignatureError as exc:
                if exc.reason != "untrusted":  # the files or the signature itself are bad: no key will do
                    raise
                failures.append(f"{entry.name}: {exc}")
                continue
            return TrustedSignature(entry, verified)
        raise SignatureError(f"{bundle}: the signature does not verify with any trusted "
                             f"{'key' if kind == 'key' else 'CA'}: {'; '.join(failures)}", "untrusted")

    def verify(self, bundle: Path, *, now: datetime.datetime | None = None) -> TrustedSignature:
        """Identify the signer and require the entry to be valid now."""
        now = now or utc_now()
        trusted = self.identify(bundle, now=now)
        check_validity(trusted.entry, now)
        return trusted

    def _untrusted(self, bundle: Path, info: signing.SignatureInfo) -> str:
        if info.method == "key":
            signer = f"key {info.key_hint[:16]}" if info.key_hint else "a key (no key id recorded)"
        else:
            signer = f"certificate {info.leaf_subject}"
        known = ", ".join(entry.describe() for entry in self.entries) or "none"
        problems = f"; problems: {'; '.join(self.problems)}" if self.problems else ""
        return (f"{bundle}: signed by {signer}, which is not in the trust store {self.source} "
                f"(trusted: {known}){problems}")


def check_validity(entry: TrustEntry, now: datetime.datetime) -> None:
    if entry.expired(now):
        assert entry.not_after is not None
        raise SignatureError(f"signed by {entry.name} (key {entry.key_id[:16]}), which expired on "
                             f"{_iso(entry.not_after)}; sign with a current key", "expired")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load_entry(path: Path, sidecar: Path | None) -> list[TrustEntry]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustStoreError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if b"PRIVATE KEY-----" in data:
        raise TrustStoreError(f"{path}: holds a PRIVATE key; the car needs only the public key: remove this file "
                              "and treat the key as exposed")
    not_after, note = _read_sidecar(sidecar) if sidecar is not None and sidecar.exists() else (None, None)
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise TrustStoreError(f"{path}: not a readable PEM certificate: {exc}") from None
        entries = []
        for index, certificate in enumerate(certificates):
            expiry = certificate.not_valid_after_utc if not_after is None else min(not_after,
                                                                                   certificate.not_valid_after_utc)
            name = path.stem if len(certificates) == 1 else f"{path.stem}#{index}"
            fingerprint = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
            entries.append(TrustEntry(name, path, "ca", fingerprint, expiry, note))
        return entries
    if b"-----BEGIN PUBLIC KEY-----" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise TrustStoreError(f"{path}: not a readable PEM public key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                     "secp521r1"):
            raise TrustStoreError(f"{path}: not an ECDSA P-256, P-384 or P-521 public key "
                                  f"({type(key).__name__}); model signing takes only those")
        return [TrustEntry(path.stem, path, "key", signing.public_key_id(data), not_after, note)]
    raise TrustStoreError(f"{path}: neither a PEM public key nor a PEM certificate")


def _read_sidecar(path: Path) -> tuple[datetime.datetime | None, str | None]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TrustStoreError(f"{path}: not readable TOML: {exc}") from None
    unknown = sorted(set(data) - SIDECAR_KEYS)
    if unknown:
        raise TrustStoreError(f"{path}: {', '.join(unknown)}: unknown key (known: not_after, note)")
    not_after = data.get("not_after")
    if not_after is not None and not (isinstance(not_after, datetime.datetime) and not_after.tzinfo is not None):
        raise TrustStoreError(f"{path}: not_after: must be a date and time with a time zone, "
                              f"e.g. not_after = 2027-06-01T00:00:00Z (got {not_after!r})")
    note = data.get("note")
    if note is not None and not isinstance(note, str):
        raise TrustStoreError(f"{path}: note: must be a string")
    return not_after, note
