"""The trust store: several keys at once, not-after dates, CA certificates, broken entries reported."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.bundle import signing
from agent.bundle.errors import SignatureError, TrustStoreError
from agent.bundle.trust import TrustStore
from tests.bundles import issue_signing_certificate, make_bundle, make_ca, make_key

NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A trust directory with an old key (expired 2026-06-01) and a current one; private keys kept apart."""
    trust, keys = tmp_path / "trusted-keys", tmp_path / "keys"
    trust.mkdir()
    keys.mkdir()
    private = {}
    for name in ("fleet-2025", "fleet-2026"):
        private[name], public = make_key(keys, name)
        public.rename(trust / f"{name}.pem")
    (trust / "fleet-2025.toml").write_text('not_after = 2026-06-01T00:00:00Z\nnote = "rotated out"\n')
    (trust / "fleet-2026.toml").write_text("not_after = 2027-06-01T00:00:00Z\n")
    return trust, private


def signed_by(tmp_path: Path, key: Path, name: str = "bundle") -> Path:
    bundle = make_bundle(tmp_path / name)
    signing.sign_with_key(bundle, key)
    return bundle


def test_the_current_key_verifies_and_is_named(store: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    trust_dir, private = store
    trust = TrustStore.load(trust_dir)
    assert trust.problems == []
    assert [entry.name for entry in trust.entries] == ["fleet-2025", "fleet-2026"]
    trusted = trust.verify(signed_by(tmp_path, private["fleet-2026"]), now=NOW)
    assert trusted.entry.name == "fleet-2026"
    assert trusted.entry.not_after == datetime.datetime(2027, 6, 1, tzinfo=datetime.UTC)


def test_an_expired_key_is_reported_as_expired(store: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    trust_dir, private = store
    trust = TrustStore.load(trust_dir)
    bundle = signed_by(tmp_path, private["fleet-2025"])
    assert trust.identify(bundle, now=NOW).entry.name == "fleet-2025"  # the signature itself is good
    with pytest.raises(SignatureError) as caught:
        trust.verify(bundle, now=NOW)
    assert caught.value.reason == "expired"
    assert "signed by fleet-2025" in str(caught.value) and "expired on 2026-06-01T00:00:00Z" in str(caught.value)
    # Before its date the same key was good: time is passed in.
    assert trust.verify(bundle, now=NOW - datetime.timedelta(days=365)).entry.name == "fleet-2025"


def test_rotation_a_new_key_can_be_added_beside_the_old(store: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    trust_dir, _ = store
    private_2027, public_2027 = make_key(tmp_path, "fleet-2027")
    bundle = signed_by(tmp_path, private_2027)
    with pytest.raises(SignatureError) as caught:
        TrustStore.load(trust_dir).verify(bundle, now=NOW)
    assert caught.value.reason == "untrusted"
    assert "which is not in the trust store" in str(caught.value) and "fleet-2026 (key" in str(caught.value)
    public_2027.rename(trust_dir / "fleet-2027.pem")
    assert TrustStore.load(trust_dir).verify(bundle, now=NOW).entry.name == "fleet-2027"


def test_broken_entries_are_reported_and_skipped(store: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    trust_dir, private = store
    (trust_dir / "leaked.pem").write_bytes(private["fleet-2026"].read_bytes())
    (trust_dir / "garbage.pem").write_text("hello")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (trust_dir / "rsa.pem").write_bytes(rsa_key.public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    (trust_dir / "orphan.toml").write_text("not_after = 2027-01-01T00:00:00Z\n")
    (trust_dir / "README").write_text("ignored: not an entry")
    trust = TrustStore.load(trust_dir)
    problems = "\n".join(trust.problems)
    assert "leaked.pem: holds a PRIVATE key" in problems
    assert "garbage.pem: neither a PEM public key nor a PEM certificate" in problems
    assert "rsa.pem: not an ECDSA P-256, P-384 or P-521 public key (RSAPublicKey)" in problems
    assert "orphan.toml: a not_after sidecar without orphan.pem" in problems
    assert len(trust.problems) == 4
    assert trust.verify(signed_by(tmp_path, private["fleet-2026"]), now=NOW).entry.name == "fleet-2026"


@pytest.mark.parametrize(("sidecar", "expected"), [
    ("not_afterr = 2027-01-01T00:00:00Z\n", "not_afterr: unknown key"),
    ("not_after = 2027-01-01T00:00:00\n", "not_after: must be a date and time with a time zone"),
    ("not_after = 2027-01-01\n", "not_after: must be a date and time with a time zone"),
    ('not_after = "2027-01-01T00:00:00Z"\n', "not_after: must be a date and time with a time zone"),
    ("not_after = \n", "not readable TOML"),
])
def test_sidecar_errors_name_the_key(store: tuple[Path, dict[str, Path]], sidecar: str, expected: str) -> None:
    trust_dir, _ = store
    (trust_dir / "fleet-2026.toml").write_text(sidecar)
    trust = TrustStore.load(trust_dir)
    assert [entry.name for entry in trust.entries] == ["fleet-2025"]  # a bad sidecar disables its key
    assert len(trust.problems) == 1 and "fleet-2026.toml" in trust.problems[0] and expected in trust.problems[0]


def test_no_trust_directory(tmp_path: Path) -> None:
    private, _ = make_key(tmp_path, "fleet")
    trust = TrustStore.load(tmp_path / "missing")
    with pytest.raises(SignatureError) as caught:
        trust.verify(signed_by(tmp_path, private), now=NOW)
    assert caught.value.reason == "untrusted" and "no such directory (no trusted keys)" in str(caught.value)


def test_a_ca_certificate_entry_verifies_certificate_signed_bundles(tmp_path: Path) -> None:
    trust_dir = tmp_path / "trusted-keys"
    trust_dir.mkdir()
    _, ca_path, ca_key, ca_certificate = make_ca(tmp_path, "fleet-ca")
    (trust_dir / "fleet-ca.crt").write_bytes(ca_path.read_bytes())
    leaf_key, leaf_certificate = issue_signing_certificate(tmp_path, "ci-signer", ca_key, ca_certificate)
    bundle = make_bundle(tmp_path / "bundle")
    signing.sign_with_certificate(bundle, leaf_key, leaf_certificate, [ca_path])
    trust = TrustStore.load(trust_dir)
    entry = trust.entries[0]
    assert entry.kind == "ca" and entry.not_after == ca_certificate.not_valid_after_utc  # the CA's own expiry
    trusted = trust.verify(bundle)
    assert trusted.entry.name == "fleet-ca" and trusted.verified.signer_subject == "CN=ci-signer"
    (trust_dir / "fleet-ca.toml").write_text("not_after = 2020-01-01T00:00:00Z\n")  # the earlier date wins
    with pytest.raises(SignatureError, match="expired on 2020-01-01T00:00:00Z"):
        TrustStore.load(trust_dir).verify(bundle)


def test_from_files_for_an_explicit_key(tmp_path: Path) -> None:
    private, public = make_key(tmp_path, "fleet")
    assert TrustStore.from_files([public]).verify(signed_by(tmp_path, private)).entry.name == "fleet"
    with pytest.raises(TrustStoreError, match="holds a PRIVATE key"):
        TrustStore.from_files([private])
