"""The staging pipeline: from a bundle (directory, tar or URL) to a verified, smoke-tested staged slot.

Order, cheapest refusal first and nothing acted on before it is signed:

    fetch (URLs) -> unpack -> signature -> key_validity -> manifest -> digests -> kind -> agent_version
    -> smoke -> store

The bundle is copied (or unpacked) into a private workspace on the store's file system first, and
that copy is what gets verified, smoke-tested and then renamed into the staged slot: nothing can
change the files between the check and the install. The store's lock is held throughout, so the
daemon and the CLI never stage at once.

Every step reports through ``on_step(step, detail)``: ``detail["status"]`` is ``started``,
``progress`` (fetch only), ``passed``, ``skipped`` (signature checks on an unsigned bundle when
``models.require_signed`` is false) or ``failed`` (with ``error`` and, for signatures, ``reason``).
From the manifest step's ``passed`` on, every detail also carries ``bundle``: name, version and the
model's sha256 (what an event names).
A refusal raises StageError naming the step.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.bundle import archive, signing
from agent.bundle.errors import BundleError, SignatureError, StageError, StoreError
from agent.bundle.fetch import Limits, fetch
from agent.bundle.manifest import Manifest, agent_satisfies, read_manifest
from agent.bundle.smoke import SmokeReport, run_smoke
from agent.bundle.store import ModelStore, Slot, copy_files
from agent.bundle.trust import TrustStore, check_validity, utc_now
from agent.errors import AgentError

if TYPE_CHECKING:
    from agent.config import AgentConfig

STEPS = ("fetch", "unpack", "signature", "key_validity", "manifest", "digests", "kind", "agent_version", "smoke",
         "store")
OnStep = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class StageSettings:
    require_signed: bool = True
    max_bytes: int = 256 * 1024 * 1024
    smoke_budget_ms: float = 40.0
    smoke_timeout_s: float = 60.0
    num_threads: int = 2
    frames: Path | None = None  # recorded reference frames for the smoke test (.npy), beside the synthetic ones
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class StagedModel:
    """What was staged: the record the daemon keeps and reports."""

    name: str
    version: str
    kind: str
    sha256: str  # of the .tflite
    signer_key_id: str | None  # None: unsigned (models.require_signed = false)
    trust_entry: str | None  # the trust store file that verified it
    bundle_id: str
    path: Path  # the bundle directory in the store (immutable)
    model_path: Path
    manifest: Manifest
    smoke: SmokeReport

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": self.kind, "sha256": self.sha256,
                "signer_key_id": self.signer_key_id, "trust_entry": self.trust_entry, "bundle_id": self.bundle_id,
                "path": str(self.path), "invoke_p99_ms": self.smoke.invoke_p99_ms}


class _Steps:
    def __init__(self, on_step: OnStep | None) -> None:
        self.on_step = on_step or (lambda step, detail: None)
        self.context: dict[str, Any] = {}

    def emit(self, step: str, status: str, **detail: Any) -> None:
        self.on_step(step, {"status": status, **detail, **self.context})

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Report started, then passed with what the body put in the yielded dict, or failed and raise."""
        self.emit(name, "started")
        detail: dict[str, Any] = {}
        try:
            yield detail
        except StageError:
            raise
        except (AgentError, OSError) as exc:
            reason = exc.reason if isinstance(exc, SignatureError) else None
            message = str(exc) if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
            self.emit(name, "failed", error=message, **({"reason": reason} if reason else {}))
            raise StageError(name, message, reason) from exc
        self.emit(name, "passed", **detail)


def stage_bundle(source: Path, *, store: ModelStore, trust: TrustStore, settings: StageSettings,
                 on_step: OnStep | None = None, now: datetime.datetime | None = None,
                 _steps: _Steps | None = None) -> StagedModel:
    """Verify and smoke-test a bundle directory or tar, and install it in the staged slot.

    Raises StageError (``.step`` names the refusing step); the store is unchanged on any refusal.
    """
    steps = _steps or _Steps(on_step)
    now = now or utc_now()
    with store.lock():
        workspace = store.workspace()
        try:
            return _stage(source, workspace, store, trust, settings, steps, now)
        finally:
            if workspace.exists():  # not installed: a refusal (or an error) leaves nothing behind
                _remove(workspace)


def _stage(source: Path, workspace: Path, store: ModelStore, trust: TrustStore, settings: StageSettings,
           steps: _Steps, now: datetime.datetime) -> StagedModel:
    with steps.step("unpack") as detail:
        detail.update(source=str(source), files=load_into(source, workspace, max_bytes=settings.max_bytes))

    checked = check_bundle(workspace, trust=trust, require_signed=settings.require_signed, steps=steps, now=now)
    manifest = checked.manifest
    model_path = workspace / manifest.model.file
    with steps.step("smoke") as detail:
        report = run_smoke(model_path, budget_ms=settings.smoke_budget_ms, timeout_s=settings.smoke_timeout_s,
                           frames=settings.frames, kind=manifest.kind, num_threads=settings.num_threads)
        if report.image_shape != tuple(manifest.input_shape):
            raise BundleError(f"the model takes {list(report.image_shape)} frames, the manifest says "
                              f"{list(manifest.input_shape)}")
        detail.update(invoke_p50_ms=report.invoke_p50_ms, invoke_p99_ms=report.invoke_p99_ms,
                      budget_ms=settings.smoke_budget_ms, frames=report.frames, seconds=round(report.seconds, 2))

    with steps.step("store") as detail:
        slot = store.install_prepared(workspace)
        detail.update(slot="staged", bundle_id=slot.bundle_id, path=str(slot.path))

    return StagedModel(manifest.name, manifest.version, manifest.kind, manifest.model.sha256,
                       checked.signer_key_id, checked.trust_entry, slot.bundle_id, slot.path,
                       slot.path / manifest.model.file, manifest, report)


def load_into(source: Path, directory: Path, *, max_bytes: int) -> list[str]:
    """Copy a bundle directory, or safely unpack a bundle tar, into an empty ``directory``; the file names."""
    if source.is_dir():
        size = sum(path.stat().st_size for path in source.iterdir() if path.is_file())
        if size > max_bytes:
            raise BundleError(f"{source}: {size} bytes, more than the {max_bytes} allowed (models.max_bundle_mb)")
        copy_files(source, directory)
        return sorted(path.name for path in directory.iterdir())
    if archive.is_archive(source):
        return sorted(archive.unpack(source, directory, max_bytes=max_bytes))
    if source.exists():
        raise BundleError(f"{source}: not a bundle (a directory, or a .tar, .tar.gz or .tgz of one)")
    raise BundleError(f"{source}: no such file or directory")


@dataclass(frozen=True)
class CheckedBundle:
    manifest: Manifest
    signer_key_id: str | None  # None: unsigned, accepted because require_signed is false
    trust_entry: str | None


def check_bundle(bundle: Path, *, trust: TrustStore, require_signed: bool = True, on_step: OnStep | None = None,
                 now: datetime.datetime | None = None, steps: _Steps | None = None) -> CheckedBundle:
    """The checks that need no model runtime: signature, key validity, manifest, digests, kind, agent version.

    ``model verify`` runs these alone; staging runs them, then the smoke test. Raises StageError.
    """
    steps = steps or _Steps(on_step)
    now = now or utc_now()
    signer_key_id = trust_entry = None
    if not (bundle / signing.SIGNATURE_FILE).exists() and not require_signed:
        warning = "UNSIGNED bundle accepted because models.require_signed = false"
        steps.emit("signature", "skipped", warning=warning)
        steps.emit("key_validity", "skipped", warning=warning)
    else:
        with steps.step("signature") as detail:
            trusted = trust.identify(bundle, now=now)
            signer_key_id, trust_entry = trusted.signer_id, trusted.entry.name
            detail.update(method=trusted.verified.method, key=trusted.entry.name, signer_id=trusted.signer_id,
                          **({"subject": trusted.verified.signer_subject} if trusted.verified.signer_subject else {}))
        with steps.step("key_validity") as detail:
            check_validity(trusted.entry, now)
            not_after = trusted.entry.not_after
            detail.update(key=trusted.entry.name, not_after=not_after.isoformat() if not_after else None)

    with steps.step("manifest") as detail:
        manifest = read_manifest(bundle)
        steps.context["bundle"] = {"name": manifest.name, "version": manifest.version,
                                   "sha256": manifest.model.sha256}
        detail.update(kind=manifest.kind, created=manifest.created.isoformat(),
                      min_agent_version=manifest.min_agent_version)

    with steps.step("digests") as detail:
        digest, size = _sha256(bundle / manifest.model.file)
        if size != manifest.model.bytes:
            raise BundleError(f"{manifest.model.file}: {size} bytes, the manifest says {manifest.model.bytes}")
        if digest != manifest.model.sha256:
            raise BundleError(f"{manifest.model.file}: sha256 {digest}, the manifest says {manifest.model.sha256}")
        detail.update(file=manifest.model.file, bytes=size)

    with steps.step("kind") as detail:
        from agent.pilot.model import FLEX_KINDS, KIND_SIGNATURES

        if manifest.kind not in KIND_SIGNATURES:
            flex = " (it needs TensorFlow's Flex ops, which the car's LiteRT lacks)" if manifest.kind in set(
                FLEX_KINDS.values()) else ""
            raise BundleError(f"kind {manifest.kind!r} is not one this agent runs{flex}; it runs "
                              f"{', '.join(KIND_SIGNATURES)}")
        detail.update(kind=manifest.kind)

    with steps.step("agent_version") as detail:
        if not agent_satisfies(manifest.min_agent_version, __version__):
            raise BundleError(f"needs donkey-agent {manifest.min_agent_version} or newer; this is {__version__}")
        detail.update(min_agent_version=manifest.min_agent_version, agent_version=__version__)
    return CheckedBundle(manifest, signer_key_id, trust_entry)


def stage_url(url: str, *, sha256: str | None, size: int | None, downloads: Path, store: ModelStore,
              trust: TrustStore, settings: StageSettings, on_step: OnStep | None = None,
              now: datetime.datetime | None = None) -> StagedModel:
    """Download a bundle tar (resuming a partial download of the same sha256), then ``stage_bundle`` it."""
    steps = _Steps(on_step)
    name = f"{sha256 or 'download'}.tar"  # the format is sniffed when unpacking; the name only needs the suffix
    with steps.step("fetch") as detail:
        def progress(done: int, total: int | None) -> None:
            steps.emit("fetch", "progress", bytes=done, total=total)

        path = fetch(url, downloads / name, sha256=sha256, size=size, limits=settings.limits, on_progress=progress)
        detail.update(url=url, bytes=path.stat().st_size)
    try:
        return stage_bundle(path, store=store, trust=trust, settings=settings, now=now, _steps=steps)
    finally:
        path.unlink(missing_ok=True)


# -- what the store holds ----------------------------------------------------------------------------
@dataclass(frozen=True)
class InstalledModel:
    slot: str
    bundle_id: str
    name: str
    version: str
    kind: str
    sha256: str
    signer_key_id: str | None
    model_path: Path
    installed: datetime.datetime

    def summary(self) -> dict[str, Any]:
        return {"slot": self.slot, "bundle_id": self.bundle_id, "name": self.name, "version": self.version,
                "kind": self.kind, "sha256": self.sha256, "signer_key_id": self.signer_key_id,
                "model": str(self.model_path), "installed": self.installed.strftime("%Y-%m-%dT%H:%M:%SZ")}


def installed(slot: Slot) -> InstalledModel:
    """Describe a slot's bundle (verified when it was staged; not verified again here)."""
    manifest = read_manifest(slot.path)
    signer = None
    with contextlib.suppress(SignatureError):
        info = signing.read_signature(slot.path)
        signer = info.key_hint or info.leaf_fingerprint
    return InstalledModel(slot.name, slot.bundle_id, manifest.name, manifest.version, manifest.kind,
                          manifest.model.sha256, signer, slot.path / manifest.model.file,
                          datetime.datetime.fromtimestamp(slot.installed, datetime.UTC))


def inbox_bundles(inbox: Path) -> list[Path]:
    """Bundle tars dropped in the inbox, oldest first. Hidden files and ``*.part`` are still being written
    (drop a bundle by writing ``.NAME`` or ``NAME.part`` and renaming it, as Ansible's copy module does)."""
    if not inbox.is_dir():
        return []
    found = [path for path in inbox.iterdir()
             if path.is_file() and not path.name.startswith(".") and archive.is_archive(path)]
    return sorted(found, key=lambda path: (path.stat().st_mtime, path.name))


# -- configuration -----------------------------------------------------------------------------------
def store_root(config: AgentConfig) -> Path:
    from agent.service.state import state_directory

    return config.models.store if config.models.store is not None else state_directory(config) / "models"


def inbox_directory(config: AgentConfig) -> Path:
    from agent.service.state import state_directory

    return config.models.inbox if config.models.inbox is not None else state_directory(config) / "inbox"


def settings_from_config(config: AgentConfig) -> StageSettings:
    models = config.models
    limits = Limits(max_bytes=int(models.max_bundle_mb * 1024 * 1024), connect_timeout_s=models.connect_timeout_s,
                    read_timeout_s=models.read_timeout_s, deadline_s=models.download_deadline_s,
                    attempts=models.download_attempts, keep_free_bytes=int(models.keep_free_mb * 1024 * 1024))
    return StageSettings(require_signed=models.require_signed, max_bytes=limits.max_bytes,
                         smoke_budget_ms=models.smoke_budget_ms, smoke_timeout_s=models.smoke_timeout_s,
                         num_threads=config.autopilot.num_threads, frames=models.smoke_frames, limits=limits)


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise BundleError(f"{path.name}: named by the manifest but not in the bundle") from None
    return digest.hexdigest(), size


def _remove(path: Path) -> None:
    import shutil

    for child in path.iterdir():
        child.chmod(0o644)
    shutil.rmtree(path)


__all__ = ["STEPS", "CheckedBundle", "InstalledModel", "OnStep", "StageError", "StageSettings", "StagedModel",
           "StoreError", "check_bundle", "inbox_bundles", "inbox_directory", "installed", "load_into",
           "settings_from_config", "stage_bundle", "stage_url", "store_root"]
