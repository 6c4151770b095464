"""Signing and verifying bundles through model-signing 1.1.1's API, and with its own CLI both ways."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from agent.bundle import signing
from agent.bundle.errors import SignatureError
from tests.bundles import CLI_SIGNER, issue_signing_certificate, make_bundle, make_ca, make_key


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    private, public = make_key(tmp_path, "fleet")
    bundle = make_bundle(tmp_path / "bundle")
    signing.sign_with_key(bundle, private)
    return bundle, private, public


def refusal(bundle: Path, public: Path) -> SignatureError:
    with pytest.raises(SignatureError) as caught:
        signing.verify_with_key(bundle, public)
    return caught.value


def test_a_signed_bundle_verifies_and_names_its_signer(signed: tuple[Path, Path, Path]) -> None:
    bundle, _, public = signed
    verified = signing.verify_with_key(bundle, public)
    assert verified.method == "key"
    assert verified.signer_id == signing.public_key_id(public.read_bytes())
    assert sorted(verified.files) == ["manifest.json", "pilot.tflite"]


@pytest.mark.parametrize("name", ["pilot.tflite", "manifest.json"])
def test_a_one_byte_change_to_any_file_is_named(signed: tuple[Path, Path, Path], name: str) -> None:
    bundle, _, public = signed
    with (bundle / name).open("ab") as handle:
        handle.write(b" ")
    error = refusal(bundle, public)
    assert error.reason == "tampered"
    assert f"changed: {name} (signed sha256 " in str(error)


def test_an_added_file_is_refused(signed: tuple[Path, Path, Path]) -> None:
    bundle, _, public = signed
    (bundle / "notes.txt").write_text("hello")
    error = refusal(bundle, public)
    assert error.reason == "tampered" and "added (not signed): notes.txt" in str(error)


def test_an_added_git_file_is_refused_although_the_library_skips_it(signed: tuple[Path, Path, Path]) -> None:
    bundle, _, public = signed
    (bundle / ".gitattributes").write_text("* binary")
    error = refusal(bundle, public)
    assert error.reason == "tampered" and "added (not signed): .gitattributes" in str(error)


def test_a_removed_file_is_refused(signed: tuple[Path, Path, Path]) -> None:
    bundle, _, public = signed
    (bundle / "manifest.json").unlink()
    error = refusal(bundle, public)
    assert error.reason == "tampered" and "missing (signed, not present): manifest.json" in str(error)


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_anything_but_regular_files_is_refused(signed: tuple[Path, Path, Path], kind: str) -> None:
    bundle, _, public = signed
    if kind == "directory":
        (bundle / "extra").mkdir()
    else:
        (bundle / "extra").symlink_to("pilot.tflite")
    error = refusal(bundle, public)
    assert error.reason == "malformed" and "extra is a" in str(error)


def test_a_wrong_key_is_refused(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, _, _ = signed
    _, other = make_key(tmp_path, "other")
    error = refusal(bundle, other)
    assert error.reason == "untrusted" and "not by" in str(error) and str(other) in str(error)


def test_a_forged_key_id_does_not_help(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, _, _ = signed
    _, other = make_key(tmp_path, "other")
    document = json.loads((bundle / "model.sig").read_text())
    document["verificationMaterial"]["publicKey"]["hint"] = signing.public_key_id(other.read_bytes())
    (bundle / "model.sig").write_text(json.dumps(document))
    error = refusal(bundle, other)
    assert error.reason == "untrusted" and "does not verify with" in str(error)


def test_a_rewritten_payload_breaks_the_signature(signed: tuple[Path, Path, Path]) -> None:
    bundle, _, public = signed
    with (bundle / "pilot.tflite").open("ab") as handle:
        handle.write(b"evil")
    document = json.loads((bundle / "model.sig").read_text())
    payload = json.loads(base64.b64decode(document["dsseEnvelope"]["payload"]))
    import hashlib

    for resource in payload["predicate"]["resources"]:  # claim the tampered file's digest
        if resource["name"] == "pilot.tflite":
            resource["digest"] = hashlib.sha256((bundle / "pilot.tflite").read_bytes()).hexdigest()
    document["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    (bundle / "model.sig").write_text(json.dumps(document))
    assert refusal(bundle, public).reason == "untrusted"


def test_an_unsigned_bundle(tmp_path: Path) -> None:
    _, public = make_key(tmp_path, "fleet")
    bundle = make_bundle(tmp_path / "bundle")
    error = refusal(bundle, public)
    assert error.reason == "unsigned" and "unsigned (no model.sig)" in str(error)
    with pytest.raises(SignatureError, match="unsigned"):
        signing.read_signature(bundle)


@pytest.mark.parametrize("content", [b"not json", b"{}", b'{"verificationMaterial": {}, "dsseEnvelope": {}}'])
def test_a_malformed_signature(signed: tuple[Path, Path, Path], content: bytes) -> None:
    bundle, _, public = signed
    (bundle / "model.sig").write_bytes(content)
    error = refusal(bundle, public)
    assert error.reason == "malformed" and "not a model-signing signature bundle" in str(error)


def test_signing_refuses_hidden_files(tmp_path: Path) -> None:
    private, _ = make_key(tmp_path, "fleet")
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / ".DS_Store").write_bytes(b"x")
    with pytest.raises(SignatureError, match=r"hidden files do not belong in a bundle: \.DS_Store"):
        signing.sign_with_key(bundle, private)


def test_certificate_chain_signing(tmp_path: Path) -> None:
    _, ca_path, ca_key, ca_certificate = make_ca(tmp_path, "fleet-ca")
    leaf_key, leaf_certificate = issue_signing_certificate(tmp_path, "ci-signer", ca_key, ca_certificate)
    bundle = make_bundle(tmp_path / "bundle")
    with pytest.raises(SignatureError, match="certificate signing needs --chain"):
        signing.sign_with_certificate(bundle, leaf_key, leaf_certificate)
    signing.sign_with_certificate(bundle, leaf_key, leaf_certificate, [ca_path])
    verified = signing.verify_with_certificates(bundle, [ca_path])
    assert verified.method == "certificate" and verified.signer_subject == "CN=ci-signer"
    _, other_ca, _, _ = make_ca(tmp_path, "other-ca")
    with pytest.raises(SignatureError) as caught:
        signing.verify_with_certificates(bundle, [other_ca])
    assert caught.value.reason == "untrusted" and "CN=ci-signer" in str(caught.value)
    _, public = make_key(tmp_path, "fleet")
    with pytest.raises(SignatureError, match=r"signed with a certificate, but .* is a public key"):
        signing.verify_with_key(bundle, public)


# -- the library's own CLI, both ways ----------------------------------------------------------------
def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI_SIGNER, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_a_bundle_signed_by_the_library_cli_verifies_here(tmp_path: Path) -> None:
    private, public = make_key(tmp_path, "fleet")
    bundle = make_bundle(tmp_path / "bundle")
    result = run_cli("sign", "key", "--private_key", private, "--signature", bundle / "model.sig", bundle)
    assert result.returncode == 0, result.stderr
    assert signing.verify_with_key(bundle, public).signer_id == signing.public_key_id(public.read_bytes())


def test_a_bundle_signed_here_verifies_with_the_library_cli(signed: tuple[Path, Path, Path]) -> None:
    bundle, _, public = signed
    result = run_cli("verify", "key", "--public_key", public, "--signature", bundle / "model.sig", bundle)
    assert result.returncode == 0 and "Verification succeeded" in result.stdout, result.stdout + result.stderr
    (bundle / "manifest.json").write_text("{}")
    result = run_cli("verify", "key", "--public_key", public, "--signature", bundle / "model.sig", bundle)
    assert result.returncode != 0  # the library's CLI agrees a change is a failure


def test_certificate_signatures_interoperate_with_the_library_cli(tmp_path: Path) -> None:
    _, ca_path, ca_key, ca_certificate = make_ca(tmp_path, "fleet-ca")
    leaf_key, leaf_certificate = issue_signing_certificate(tmp_path, "ci-signer", ca_key, ca_certificate)
    theirs = make_bundle(tmp_path / "theirs")
    result = run_cli("sign", "certificate", "--private_key", leaf_key, "--signing_certificate", leaf_certificate,
                     "--certificate_chain", ca_path, "--signature", theirs / "model.sig", theirs)
    assert result.returncode == 0, result.stderr
    assert signing.verify_with_certificates(theirs, [ca_path]).signer_subject == "CN=ci-signer"
    ours = make_bundle(tmp_path / "ours")
    signing.sign_with_certificate(ours, leaf_key, leaf_certificate, [ca_path])
    result = run_cli("verify", "certificate", "--certificate_chain", ca_path, "--signature", ours / "model.sig", ours)
    assert result.returncode == 0 and "Verification succeeded" in result.stdout, result.stdout + result.stderr
