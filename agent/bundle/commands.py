"""``donkey-agent model pack|sign|verify|install|list|rollback``: the bundle tools as commands.

Exit codes: 0 done; 1 refused (verification or staging failed, nothing to roll back); 65 the model
itself cannot run on the car (``pack``, as ``model check``); 78 an invalid config or trust store
argument. Errors go to stderr, one line that names the step and the problem; ``--json`` prints one
JSON document on stdout instead of the table.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.bundle import signing
from agent.bundle.errors import BundleError, ManifestError, StageError, StoreError, TrustStoreError
from agent.bundle.manifest import (
    FORMAT,
    MANIFEST_FILE,
    Manifest,
    ModelFile,
    Provenance,
    dump_manifest,
    format_errors,
    read_manifest,
    release,
)
from agent.config import AgentConfig, ConfigError, config_path, load

EXIT_REFUSED = 1
EXIT_MODEL = 65
EXIT_CONFIG = 78


def _config(path: Path | None) -> AgentConfig:
    return load(config_path(path))


def _fail(command: str, message: str, code: int = EXIT_REFUSED) -> int:
    print(f"donkey-agent model {command}: {message}", file=sys.stderr)
    return code


# -- pack --------------------------------------------------------------------------------------------
def pack(directory: Path, model: Path, *, name: str, version: str, provenance: str | None, kind: str,
         min_agent_version: str | None, as_json: bool) -> int:
    """Check the model as the car would, then write DIR/{model file, manifest.json}."""
    from agent.pilot.check import check_model
    from agent.pilot.model import ModelError

    if directory.exists() and any(directory.iterdir()):
        return _fail("pack", f"{directory}: not empty; pack into a new directory")
    try:
        report = check_model(model, kind=kind)
    except (ModelError, ValueError) as exc:
        return _fail("pack", f"the car cannot run this model:\n{exc}", EXIT_MODEL)
    try:
        origin = _provenance(provenance)
        shape = report["inputs"]["img_in"]["shape"][1:]
        manifest = Manifest.model_validate({
            "format": FORMAT, "name": name, "version": version, "kind": report["kind"],
            "input_shape": tuple(shape),
            "created": datetime.datetime.now(datetime.UTC).replace(microsecond=0),
            "min_agent_version": min_agent_version or ".".join(str(part) for part in release(__version__)),
            "model": ModelFile(file=model.name, sha256=report["sha256"], bytes=model.stat().st_size),
            "provenance": origin,
        }, strict=False)
    except BundleError as exc:
        return _fail("pack", str(exc))
    except ValueError as exc:  # pydantic's ValidationError: --name, --version, the file name
        return _fail("pack", _fields(exc))
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, directory / model.name)
    (directory / MANIFEST_FILE).write_bytes(dump_manifest(manifest))
    summary = {"bundle": str(directory), "name": name, "version": version, "kind": manifest.kind,
               "input_shape": list(manifest.input_shape), "model": model.name, "sha256": manifest.model.sha256,
               "invoke_p99_ms": report["invoke_ms"]["p99"], "provenance": origin != Provenance()}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"packed {name} {version} ({manifest.kind}, {'x'.join(map(str, manifest.input_shape))}) in {directory}")
        print(f"model:  {model.name} sha256 {manifest.model.sha256}")
        print(f"invoke: p99 {report['invoke_ms']['p99']:.2f} ms on this machine")
        if origin == Provenance():
            print("provenance: none given (pack --provenance FILE.json records data digests, the training "
                  "command and the twin evaluation)")
        print(f"next:   donkey-agent model sign {directory} --key PRIVATE.pem")
    return 0


def _provenance(value: str | None) -> Provenance:
    if value is None:
        return Provenance()
    from pydantic import ValidationError

    source = "--provenance" if value.lstrip().startswith("{") else value
    try:
        text = value if source == "--provenance" else Path(value).read_text(encoding="utf-8")
        json.loads(text)
        return Provenance.model_validate_json(text)
    except OSError as exc:
        raise ManifestError(f"{value}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{source}: not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise ManifestError(format_errors(exc, source)) from None


def _fields(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    return "\n".join(f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in errors())


# -- sign --------------------------------------------------------------------------------------------
def sign(bundle: Path, *, key: Path, certificate: Path | None, chain: Sequence[Path], password_env: str | None,
         as_json: bool) -> int:
    """Sign a bundle that is consistent: its manifest parses and names the model's real digest."""
    from agent.bundle.stage import _sha256

    try:
        manifest = read_manifest(bundle)
        digest, size = _sha256(bundle / manifest.model.file)
        if (digest, size) != (manifest.model.sha256, manifest.model.bytes):
            raise BundleError(f"{manifest.model.file}: sha256 {digest} ({size} bytes) is not what manifest.json "
                              "says; pack the bundle again instead of signing it")
        password = os.environ.get(password_env) if password_env else None
        if password_env and password is None:
            raise BundleError(f"--password-env {password_env}: not set in the environment")
        if certificate is None:
            path = signing.sign_with_key(bundle, key, password=password)
        else:
            if password:
                raise BundleError("certificate signing takes an unencrypted key (model-signing 1.1.1)")
            path = signing.sign_with_certificate(bundle, key, certificate, chain)
        info = signing.read_signature(bundle)
    except (BundleError, OSError) as exc:
        return _fail("sign", str(exc))
    signer = info.key_hint or info.leaf_fingerprint or "?"
    if as_json:
        print(json.dumps({"signature": str(path), "method": info.method, "signer_id": signer,
                          "files": sorted(info.files)}, indent=2))
    else:
        print(f"signed {manifest.name} {manifest.version}: {path}")
        print(f"signer: {info.method} {signer[:16]}{f' ({info.leaf_subject})' if info.leaf_subject else ''}")
        print(f"files:  {', '.join(sorted(info.files))}")
    return 0


# -- verify ------------------------------------------------------------------------------------------
class _Printer:
    """Prints each step as it passes or fails (install and verify show their progress)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.steps: list[dict[str, Any]] = []
        self.last_progress = -1

    def __call__(self, step: str, detail: dict[str, Any]) -> None:
        status = detail["status"]
        if status in ("passed", "failed", "skipped"):
            self.steps.append({"step": step, **detail})
        if self.as_json or status in ("started", "failed"):  # a failure is the command's final line, on stderr
            return
        if status == "progress":
            total = detail.get("total")
            percent = int(100 * detail["bytes"] / total) if total else -1
            if percent // 10 != self.last_progress // 10:
                self.last_progress = percent
                shown = f"{percent} %" if total else f"{detail['bytes']} bytes"
                print(f"  {step:<14} {shown}", file=sys.stderr, flush=True)
            return
        print(f"  {step:<14} {status:<7} {_describe(step, detail)}", flush=True)


def _describe(step: str, detail: dict[str, Any]) -> str:
    if detail["status"] == "skipped":
        return str(detail.get("warning", ""))
    descriptions = {
        "fetch": lambda d: f"{d.get('bytes')} bytes from {d.get('url')}",
        "unpack": lambda d: ", ".join(d.get("files", [])),
        "signature": lambda d: f"{d['method']} {d['key']} ({str(d['signer_id'])[:16]})"
                               + (f" {d['subject']}" if d.get("subject") else ""),
        "key_validity": lambda d: f"{d['key']} valid until {d['not_after']}" if d.get("not_after")
        else f"{d['key']} (no expiry)",
        "manifest": lambda d: f"{d['bundle']['name']} {d['bundle']['version']}, created {d['created']}",
        "digests": lambda d: f"{d['file']} sha256 {d['bundle']['sha256'][:16]}... ({d['bytes']} bytes)",
        "kind": lambda d: str(d["kind"]),
        "agent_version": lambda d: f"needs {d['min_agent_version']}, this agent is {d['agent_version']}",
        "smoke": lambda d: f"invoke p50 {d['invoke_p50_ms']:.2f} ms, p99 {d['invoke_p99_ms']:.2f} ms "
                           f"(budget {d['budget_ms']} ms), {d['frames']} frames finite, {d['seconds']} s",
        "store": lambda d: f"staged as {d['bundle_id']}",
    }
    try:
        return descriptions[step](detail) if step in descriptions else ""
    except (KeyError, TypeError):
        return ""


def _trust(config: AgentConfig, trust_dir: Path | None, keys: Sequence[Path]) -> Any:
    from agent.bundle.trust import TrustStore

    if keys:
        return TrustStore.from_files(keys)
    return TrustStore.load(trust_dir or config.models.trust_dir)


def verify(bundle: Path, *, config_path: Path | None, trust_dir: Path | None, keys: Sequence[Path],
           as_json: bool) -> int:
    """Signature, key validity, manifest, digests, kind, agent version: everything but running the model."""
    from agent.bundle.stage import check_bundle, load_into

    try:
        config = _config(config_path)
        trust = _trust(config, trust_dir, keys)
    except (ConfigError, TrustStoreError) as exc:
        return _fail("verify", str(exc), EXIT_CONFIG)
    for problem in trust.problems:
        print(f"donkey-agent model verify: trust store: {problem}", file=sys.stderr)
    printer = _Printer(as_json)
    with tempfile.TemporaryDirectory(prefix="donkey-verify-") as scratch:
        directory = bundle
        try:
            if not bundle.is_dir():
                directory = Path(scratch)
                load_into(bundle, directory, max_bytes=int(config.models.max_bundle_mb * 1024 * 1024))
            checked = check_bundle(directory, trust=trust, require_signed=True, on_step=printer)
        except StageError as exc:
            if as_json:
                print(json.dumps({"ok": False, "step": exc.step, "reason": exc.reason, "error": exc.detail,
                                  "steps": printer.steps}, indent=2))
            return _fail("verify", str(exc))
        except BundleError as exc:
            return _fail("verify", str(exc))
    if as_json:
        print(json.dumps({"ok": True, "name": checked.manifest.name, "version": checked.manifest.version,
                          "sha256": checked.manifest.model.sha256, "signer_id": checked.signer_key_id,
                          "trust_entry": checked.trust_entry, "steps": printer.steps}, indent=2))
    else:
        print(f"verified: {checked.manifest.name} {checked.manifest.version}, signed by {checked.trust_entry}")
    return 0


# -- install, list, rollback -------------------------------------------------------------------------
def install(source: str, *, config_path: Path | None, sha256: str | None, size: int | None, as_json: bool) -> int:
    """Verify, smoke-test and stage a bundle (directory, tar or URL); prints each step as it goes."""
    from agent.bundle.stage import settings_from_config, stage_bundle, stage_url, store_root
    from agent.bundle.store import ModelStore

    try:
        config = _config(config_path)
        trust = _trust(config, None, ())
    except (ConfigError, TrustStoreError) as exc:
        return _fail("install", str(exc), EXIT_CONFIG)
    settings = settings_from_config(config)
    store = ModelStore(store_root(config))
    printer = _Printer(as_json)
    if not as_json:
        print(f"installing {source} into {store.root}")
        for problem in trust.problems:
            print(f"  trust store: {problem}", file=sys.stderr)
    try:
        store.recover()
        if source.startswith(("http://", "https://")):
            staged = stage_url(source, sha256=sha256, size=size, downloads=store.root / "downloads", store=store,
                               trust=trust, settings=settings, on_step=printer)
        else:
            staged = stage_bundle(Path(source), store=store, trust=trust, settings=settings, on_step=printer)
    except StageError as exc:
        if as_json:
            print(json.dumps({"ok": False, "step": exc.step, "reason": exc.reason, "error": exc.detail,
                              "steps": printer.steps}, indent=2))
        return _fail("install", f"refused at {exc}")
    except StoreError as exc:
        return _fail("install", str(exc))
    if as_json:
        print(json.dumps({"ok": True, **staged.summary(), "steps": printer.steps}, indent=2))
    else:
        print(f"staged: {staged.name} {staged.version} (sha256 {staged.sha256[:16]}...) in {staged.path}")
        print("the running agent activates a staged model only while the car is stopped")
    return 0


def list_models(*, config_path: Path | None, as_json: bool) -> int:
    from agent.bundle.stage import installed, store_root
    from agent.bundle.store import ModelStore

    try:
        store = ModelStore(store_root(_config(config_path)))
    except ConfigError as exc:
        return _fail("list", str(exc), EXIT_CONFIG)
    try:
        slots = store.slots() if store.root.exists() else dict.fromkeys(("active", "previous", "staged"))
        models = {name: installed(slot).summary() if slot else None for name, slot in slots.items()}
    except (StoreError, ManifestError) as exc:
        return _fail("list", f"{exc} (`donkey-agent model install` recovers the store)")
    if as_json:
        print(json.dumps({"store": str(store.root), "slots": models}, indent=2))
        return 0
    print(f"store: {store.root}")
    for name, model in models.items():
        if model is None:
            print(f"  {name:<9} (empty)")
        else:
            print(f"  {name:<9} {model['name']} {model['version']}  {model['kind']}  sha256 {model['sha256'][:16]}  "
                  f"signer {str(model['signer_key_id'] or 'UNSIGNED')[:16]}  installed {model['installed']}")
    return 0


def rollback(*, config_path: Path | None, as_json: bool) -> int:
    from agent.bundle.stage import installed, store_root
    from agent.bundle.store import ModelStore

    try:
        store = ModelStore(store_root(_config(config_path)))
    except ConfigError as exc:
        return _fail("rollback", str(exc), EXIT_CONFIG)
    try:
        store.recover()
        active = installed(store.rollback())
    except (StoreError, ManifestError) as exc:
        return _fail("rollback", str(exc))
    if as_json:
        print(json.dumps({"ok": True, "active": active.summary()}, indent=2))
    else:
        print(f"rolled back: active is now {active.name} {active.version} (sha256 {active.sha256[:16]}...)")
        print("a running agent keeps the model it loaded until it loads the active slot again")
    return 0


__all__ = ["install", "list_models", "pack", "rollback", "sign", "verify"]
