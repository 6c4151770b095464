"""Helpers for the bundle tests: throw-away keys and certificates, bundles of the shipped model, a NaN model.

Keys are made with `cryptography` in each test's tmp directory; the repository holds none.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
from pathlib import Path

import flatbuffers
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flatbuffers.table import Table

from agent.bundle.manifest import FORMAT, Manifest, dump_manifest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "pilot.tflite"
MODEL_SHA256 = hashlib.sha256(MODEL.read_bytes()).hexdigest()
CLI_SIGNER = [str(ROOT / ".venv" / "bin" / "model_signing")]


def make_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-256 key pair as PEM files: (private, public)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.key", directory / f"{name}.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path, name: str) -> tuple[Path, Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA: (key path, certificate path, key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path, key, certificate


def issue_signing_certificate(directory: Path, name: str, ca_key: ec.EllipticCurvePrivateKey,
                              ca_certificate: x509.Certificate) -> tuple[Path, Path]:
    """A code-signing leaf certificate issued by the CA: (private key path, certificate path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_certificate.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=7))
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def manifest_data(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "format": FORMAT, "name": "pilot", "version": "1.0.0", "kind": "linear", "input_shape": [120, 160, 3],
        "created": "2026-12-01T12:00:00Z", "min_agent_version": "0.1.0",
        "model": {"file": "pilot.tflite", "sha256": MODEL_SHA256, "bytes": MODEL.stat().st_size},
        "provenance": {
            "training_data": [{"name": "tub_generated_track_11", "sha256": "a" * 64, "records": 4000}],
            "training_command": "python models/train.py", "donkeycar_version": "5.3.0",
            "twin_evaluation": [{"track": "generated_track", "laps": 3, "off_track_events": 0,
                                 "mean_abs_cte": 0.0025, "max_abs_cte": 0.0084}],
        },
    }
    data.update(overrides)
    return data


def make_bundle(directory: Path, *, model_file: Path = MODEL, **overrides: object) -> Path:
    """A bundle directory of ``model_file`` (default: the shipped pilot) with a valid manifest (no signature)."""
    directory.mkdir(parents=True)
    shutil.copyfile(model_file, directory / "pilot.tflite")
    data = manifest_data(**overrides)
    if model_file != MODEL:
        payload = model_file.read_bytes()
        data["model"] = {"file": "pilot.tflite", "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    (directory / "manifest.json").write_bytes(dump_manifest(Manifest.model_validate_json(_json(data))))
    return directory


def _json(data: dict[str, object]) -> str:
    import json

    return json.dumps(data)


def nan_model(destination: Path) -> Path:
    """The shipped model with its largest weight buffer set to NaN: loads fine, answers NaN."""
    data = bytearray(MODEL.read_bytes())
    model = Table(data, flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0))
    offset = model.Offset(12)  # Model.buffers
    start, count = model.Vector(offset), model.VectorLen(offset)
    position, length = 0, 0
    for index in range(count):
        buffer = Table(data, model.Indirect(start + 4 * index))
        field = buffer.Offset(4)  # Buffer.data
        if field and buffer.VectorLen(field) > length:
            position, length = buffer.Vector(field), buffer.VectorLen(field)
    data[position:position + length - length % 4] = np.full(length // 4, np.nan, np.float32).tobytes()
    destination.write_bytes(bytes(data))
    return destination
