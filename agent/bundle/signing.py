"""Sign and verify a bundle directory with OpenSSF Model Signing (the ``model-signing`` library, 1.1.1).

``model.sig`` is a Sigstore bundle whose DSSE payload is an in-toto statement listing every file's
digest. We go through the library's public API (``model_signing.signing.Config`` and
``model_signing.verifying.Config``), so a bundle signed with ``model_signing sign key`` verifies here
and the reverse. Two checks are ours, on top of the library's:

- **Flat bundles only.** A bundle holds regular files, no directories, links or devices: nothing for
  the hasher to follow and nothing a tar could smuggle (see ``archive``).
- **Every file signed.** The library skips ``.git*`` paths and whatever the signer listed in
  ``ignore_paths``; the car accepts no file the signature does not name (``model.sig`` aside), so a
  dropped-in file is refused even where the library would pass it.

Errors are rewritten into one line naming what is wrong (``changed: model.tflite``, ``added (not
signed): notes.txt``, ``signed by key 1f2e... which this check does not trust``).
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import json
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.bundle.errors import SignatureError

SIGNATURE_FILE = "model.sig"
MAX_SIGNATURE_BYTES = 1024 * 1024
Method = Literal["key", "certificate"]


@dataclass(frozen=True)
class SignatureInfo:
    """What ``model.sig`` claims, read without verifying it (to pick the trust entries to try)."""

    method: Method
    key_hint: str | None  # key signatures: sha256 of the signer's public key (PEM SubjectPublicKeyInfo)
    leaf_fingerprint: str | None  # certificate signatures: sha256 of the signing certificate (DER)
    leaf_subject: str | None
    files: dict[str, str]  # file name -> digest, as signed
    hash_type: str


@dataclass(frozen=True)
class Verified:
    """A signature that verified: who signed (``signer_id``) and the files it covers."""

    method: Method
    signer_id: str  # key id (keys) or signing-certificate fingerprint (certificates), sha256 hex
    signer_subject: str | None
    files: dict[str, str]


def public_key_id(pem: bytes) -> str:
    """The id the library records for a key: sha256 of the public key's PEM SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(pem)
    spki = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def bundle_files(bundle: Path) -> list[str]:
    """The names of the files a bundle holds (``model.sig`` included); refuses anything but regular files."""
    try:
        entries = sorted(bundle.iterdir())
    except FileNotFoundError:
        raise SignatureError(f"{bundle}: no such bundle directory", "malformed") from None
    except NotADirectoryError:
        raise SignatureError(f"{bundle}: not a directory (a bundle is a directory, or a tar of one)",
                             "malformed") from None
    names = []
    for entry in entries:
        mode = entry.lstat().st_mode
        if not stat.S_ISREG(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "not a file"
            raise SignatureError(f"{bundle}: {entry.name} is {what}; a bundle holds only regular files", "malformed")
        names.append(entry.name)
    return names


def _signable(bundle: Path) -> None:
    """Refuse to sign what the car would refuse: hidden files (the library skips .git* when it verifies)."""
    hidden = [name for name in bundle_files(bundle) if name.startswith(".")]
    if hidden:
        raise SignatureError(f"{bundle}: hidden files do not belong in a bundle: {', '.join(hidden)}", "malformed")


def _hashing_config() -> Any:
    import model_signing

    # As `model_signing sign key DIR --signature DIR/model.sig` does: everything but the signature.
    return model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])


def sign_with_key(bundle: Path, private_key: Path, *, password: str | None = None) -> Path:
    """Sign with an ECDSA private key (PEM; P-256, P-384 or P-521); writes and returns ``bundle/model.sig``."""
    import model_signing

    _signable(bundle)
    signature = bundle / SIGNATURE_FILE
    try:
        (model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key, password=password)
         .set_hashing_config(_hashing_config()).sign(bundle, signature))
    except (ValueError, TypeError, OSError) as exc:
        raise SignatureError(f"cannot sign {bundle} with {private_key}: {exc}", "malformed") from None
    return signature


def sign_with_certificate(bundle: Path, private_key: Path, certificate: Path,
                          chain: Sequence[Path] = ()) -> Path:
    """Sign with a key and its certificate, for fleets with a PKI.

    ``chain``: the certificates between the signing certificate and the car's trusted CA (or the CA
    itself); model-signing 1.1.1 cannot sign with an empty chain.
    """
    import model_signing

    if not chain:
        raise SignatureError("certificate signing needs --chain: the intermediate or CA certificates (PEM) that "
                             "lead to the car's trusted CA (model-signing 1.1.1 fails on an empty chain)", "malformed")
    _signable(bundle)
    signature = bundle / SIGNATURE_FILE
    try:
        (model_signing.signing.Config()
         .use_certificate_signer(private_key=private_key, signing_certificate=certificate, certificate_chain=chain)
         .set_hashing_config(_hashing_config()).sign(bundle, signature))
    except (ValueError, TypeError, OSError) as exc:
        raise SignatureError(f"cannot sign {bundle} with {certificate}: {exc}", "malformed") from None
    return signature


def read_signature(bundle: Path) -> SignatureInfo:
    """Parse ``model.sig`` (without verifying it): the method, the signer's hint and the signed files."""
    path = bundle / SIGNATURE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{bundle}: unsigned (no {SIGNATURE_FILE})", "unsigned") from None
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read: {exc.strerror or exc}", "malformed") from None
    return _parse_signature(raw, path)


def _parse_signature(raw: bytes, path: Path) -> SignatureInfo:
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path}: {len(raw)} bytes; not a signature", "malformed")
    try:
        document = json.loads(raw)
        material = document["verificationMaterial"]
        payload = json.loads(base64.b64decode(document["dsseEnvelope"]["payload"], validate=True))
        predicate = payload["predicate"]
        serialization = predicate["serialization"]
        files = {str(item["name"]): str(item["digest"]) for item in predicate["resources"]}
        method: Method
        hint = fingerprint = subject = None
        if "x509CertificateChain" in material:
            from cryptography import x509

            method = "certificate"
            leaf_der = base64.b64decode(material["x509CertificateChain"]["certificates"][0]["rawBytes"])
            leaf = x509.load_der_x509_certificate(leaf_der)
            fingerprint = hashlib.sha256(leaf_der).hexdigest()
            subject = leaf.subject.rfc4514_string()
        elif "publicKey" in material:
            method = "key"
            hint = material["publicKey"].get("hint") or None
        else:
            raise KeyError("publicKey or x509CertificateChain")
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error) as exc:
        raise SignatureError(f"{path}: not a model-signing signature bundle ({type(exc).__name__}: {exc})",
                             "malformed") from None
    if serialization.get("method") != "files":
        raise SignatureError(f"{path}: signed with {serialization.get('method')!r} serialization; the car "
                             "accepts per-file signatures (model_signing's default)", "malformed")
    return SignatureInfo(method, hint, fingerprint, subject, files, str(serialization.get("hash_type")))


def verify_with_key(bundle: Path, public_key: Path) -> Verified:
    """Verify against one public key (PEM). Raises SignatureError naming what is wrong."""
    import model_signing

    return _verify(bundle, model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key),
                   "key", str(public_key))


def verify_with_certificates(bundle: Path, ca_certificates: Sequence[Path]) -> Verified:
    """Verify a certificate-signed bundle against trusted CA certificates (PEM)."""
    import model_signing

    config = model_signing.verifying.Config().use_certificate_verifier(certificate_chain=list(ca_certificates))
    return _verify(bundle, config, "certificate", ", ".join(str(path) for path in ca_certificates))


def _verify(bundle: Path, config: Any, method: Method, trusted: str) -> Verified:
    names = bundle_files(bundle)
    signature_path = bundle / SIGNATURE_FILE
    if SIGNATURE_FILE not in names:
        raise SignatureError(f"{bundle}: unsigned (no {SIGNATURE_FILE})", "unsigned")
    raw = signature_path.read_bytes()
    info = _parse_signature(raw, signature_path)
    if info.method != method:
        raise SignatureError(f"{bundle}: signed with a {info.method}, but {trusted} is a "
                             f"{'public key' if method == 'key' else 'CA certificate'}", "untrusted")
    try:
        config.verify(bundle, signature_path)
    except Exception as exc:  # the library raises ValueError, cryptography's and pyOpenSSL's errors
        raise _explain(exc, bundle, info, trusted) from None
    if signature_path.read_bytes() != raw:
        raise SignatureError(f"{signature_path}: changed while it was being verified", "tampered")
    unsigned = sorted(set(names) - {SIGNATURE_FILE} - set(info.files))
    if unsigned:
        raise SignatureError(f"{bundle}: added (not signed): {', '.join(unsigned)}", "tampered")
    signer_id = info.key_hint if method == "key" else info.leaf_fingerprint
    return Verified(method, signer_id or "", info.leaf_subject, info.files)


def _explain(exc: Exception, bundle: Path, info: SignatureInfo, trusted: str) -> SignatureError:
    """One line for each way the library says no."""
    text = str(exc)
    name = type(exc).__name__
    if text.startswith("Signature mismatch: "):
        return SignatureError(f"{bundle}: files do not match the signature: {_diff(text, bundle, info)}", "tampered")
    if text.startswith("Key mismatch"):
        return SignatureError(f"{bundle}: signed by key {(info.key_hint or '?')[:16]}, not by {trusted}",
                              "untrusted")
    if name == "InvalidSignature":
        return SignatureError(f"{bundle}: the signature does not verify with {trusted} (another signer, or "
                              f"{SIGNATURE_FILE} was altered)", "untrusted")
    if name == "X509StoreContextError":
        return SignatureError(f"{bundle}: the signing certificate ({info.leaf_subject}) does not chain to "
                              f"{trusted}: {text}", "untrusted")
    if "cannot be used for signing" in text:
        return SignatureError(f"{bundle}: the signing certificate ({info.leaf_subject}) is not allowed to sign "
                              "(no digitalSignature key usage or codeSigning extended key usage)", "untrusted")
    return SignatureError(f"{bundle}: verification failed: {name}: {text}", "malformed")


def _diff(text: str, bundle: Path, info: SignatureInfo) -> str:
    """Rewrite the library's list of differences ("Hash mismatch for 'x': ...") as changed/added/missing."""
    try:
        items = ast.literal_eval(text[len("Signature mismatch: "):])
    except (ValueError, SyntaxError):
        return text
    if not isinstance(items, list):
        return text
    parts = []
    for entry in items:
        item = str(entry)
        if match := re.match(r"Hash mismatch for '(.*?)': Expected", item):
            name = match.group(1)
            signed = info.files.get(name, "?")
            found = ""
            if info.hash_type == "sha256" and (bundle / name).is_file():
                found = f", found {hashlib.sha256((bundle / name).read_bytes()).hexdigest()[:16]}"
            parts.append(f"changed: {name} (signed {info.hash_type} {signed[:16]}{found})")
        elif match := re.match(r"Extra files found in model '.*?': (.*)", item):
            parts.append(f"added (not signed): {match.group(1)}")
        elif match := re.match(r"Missing files in model '.*?': (.*)", item):
            parts.append(f"missing (signed, not present): {match.group(1)}")
        else:
            parts.append(item)
    return "; ".join(parts) or text
