"""The staging pipeline end to end with real parts: keys, model-signing, LiteRT in a child, the store, HTTP."""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.bundle import signing
from agent.bundle.archive import pack_tar
from agent.bundle.errors import StageError
from agent.bundle.fetch import Limits
from agent.bundle.stage import (
    STEPS,
    StageSettings,
    inbox_bundles,
    installed,
    settings_from_config,
    stage_bundle,
    stage_url,
    store_root,
)
from agent.bundle.store import ModelStore
from agent.bundle.trust import TrustStore
from agent.config import ConfigError, load
from tests.bundles import MODEL_SHA256, make_bundle, make_key, nan_model

SETTINGS = StageSettings(smoke_budget_ms=500.0, smoke_timeout_s=60.0,
                         limits=Limits(read_timeout_s=5.0, attempts=2, backoff_s=0.01, keep_free_bytes=0))


class Car:
    """A trust store with one current key, a store, and the steps reported."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.trust_dir = tmp_path / "trusted-keys"
        self.trust_dir.mkdir()
        self.private, public = make_key(tmp_path, "fleet-2026")
        public.rename(self.trust_dir / "fleet-2026.pem")
        self.key_id = signing.public_key_id((self.trust_dir / "fleet-2026.pem").read_bytes())
        self.store = ModelStore(tmp_path / "models")
        self.steps: list[tuple[str, dict[str, Any]]] = []

    def bundle(self, name: str = "bundle", *, sign: bool = True, **overrides: object) -> Path:
        bundle = make_bundle(self.tmp / name, **overrides)  # type: ignore[arg-type]
        if sign:
            signing.sign_with_key(bundle, self.private)
        return bundle

    def stage(self, source: Path, settings: StageSettings = SETTINGS, **kwargs: Any):
        return stage_bundle(source, store=self.store, trust=TrustStore.load(self.trust_dir), settings=settings,
                            on_step=lambda step, detail: self.steps.append((step, detail)), **kwargs)

    def refused(self, source: Path, settings: StageSettings = SETTINGS, **kwargs: Any) -> StageError:
        with pytest.raises(StageError) as caught:
            self.stage(source, settings, **kwargs)
        assert self.steps[-1] == (caught.value.step, {**self.steps[-1][1], "status": "failed"})
        assert self.store.slot("staged") is None  # a refusal changes nothing
        assert not (self.store.work.exists() and list(self.store.work.iterdir()))
        return caught.value

    def statuses(self) -> list[tuple[str, str]]:
        return [(step, detail["status"]) for step, detail in self.steps if detail["status"] != "progress"]


@pytest.fixture
def car(tmp_path: Path) -> Car:
    return Car(tmp_path)


def test_a_signed_bundle_is_staged_and_every_step_reported(car: Car) -> None:
    staged = car.stage(car.bundle())
    assert (staged.name, staged.version, staged.kind, staged.sha256) == ("pilot", "1.0.0", "linear", MODEL_SHA256)
    assert staged.signer_key_id == car.key_id and staged.trust_entry == "fleet-2026"
    assert staged.model_path.read_bytes() == (car.tmp / "bundle" / "pilot.tflite").read_bytes()
    slot = car.store.slot("staged")
    assert slot is not None and slot.path == staged.path and car.store.slot("active") is None
    assert car.statuses() == [(step, status) for step in STEPS[1:] for status in ("started", "passed")]
    details = dict((step, detail) for step, detail in car.steps if detail["status"] == "passed")
    assert details["signature"]["key"] == "fleet-2026" and details["signature"]["signer_id"] == car.key_id
    assert details["smoke"]["invoke_p99_ms"] > 0 and details["store"]["bundle_id"] == staged.bundle_id
    bundle = {"name": "pilot", "version": "1.0.0", "sha256": MODEL_SHA256}
    after_manifest = car.steps[car.steps.index(("manifest", details["manifest"])):]
    assert all(detail["bundle"] == bundle for _, detail in after_manifest)
    assert installed(slot).summary()["signer_key_id"] == car.key_id


def test_a_bundle_tar_is_staged(car: Car) -> None:
    archive = pack_tar(car.bundle(), car.tmp / "pilot.tar.gz")
    assert car.stage(archive).sha256 == MODEL_SHA256


@pytest.mark.parametrize(("change", "step", "reason", "message"), [
    ("tamper", "signature", "tampered", "changed: pilot.tflite"),
    ("unsigned", "signature", "unsigned", "unsigned (no model.sig)"),
    ("other-key", "signature", "untrusted", "which is not in the trust store"),
    ("expired", "key_validity", "expired", "signed by fleet-2026 (key"),
])
def test_signature_refusals(car: Car, change: str, step: str, reason: str, message: str) -> None:
    bundle = car.bundle(sign=change != "unsigned")
    now = None
    if change == "tamper":
        with (bundle / "pilot.tflite").open("ab") as handle:
            handle.write(b"\0")
    elif change == "other-key":
        other, _ = make_key(car.tmp, "stranger")
        signing.sign_with_key(bundle, other)
    elif change == "expired":
        (car.trust_dir / "fleet-2026.toml").write_text("not_after = 2026-06-01T00:00:00Z\n")
        now = datetime.datetime(2026, 12, 6, tzinfo=datetime.UTC)
    error = car.refused(bundle, now=now)
    assert (error.step, error.reason) == (step, reason) and message in str(error)
    assert car.steps[-1][1]["reason"] == reason


def test_later_refusals_name_their_step(car: Car) -> None:
    cases = [
        ({"kind": "rnn"}, "kind", "kind 'rnn' is not one this agent runs (it needs TensorFlow's Flex ops"),
        ({"min_agent_version": "99.0"}, "agent_version", f"needs donkey-agent 99.0 or newer; this is {__version__}"),
        ({"input_shape": [60, 80, 3]}, "smoke", "the model takes [120, 160, 3] frames, the manifest says [60, 80, 3]"),
        ({"model": {"file": "pilot.tflite", "sha256": "0" * 64, "bytes": 3273072}}, "digests",
         "pilot.tflite: sha256 " + MODEL_SHA256 + ", the manifest says " + "0" * 64),
    ]
    for index, (overrides, step, message) in enumerate(cases):
        error = car.refused(car.bundle(f"case{index}", **overrides))
        assert error.step == step and message in str(error), (step, str(error))


def test_an_invalid_manifest_is_refused_at_the_manifest_step(car: Car) -> None:
    bundle = make_bundle(car.tmp / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["provenance"]["twin_evaluation"][0]["laps"] = "three"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    signing.sign_with_key(bundle, car.private)  # signed, but not a manifest the car accepts
    error = car.refused(bundle)
    assert error.step == "manifest"
    assert "provenance.twin_evaluation.0.laps: Input should be a valid integer" in str(error)


def test_a_model_that_answers_nan_never_reaches_the_slots(car: Car) -> None:
    bundle = car.bundle(model_file=nan_model(car.tmp / "nan.tflite"))
    error = car.refused(bundle)
    assert error.step == "smoke" and "non-finite model output" in str(error)


def test_unsigned_bundles_when_signatures_are_not_required(car: Car) -> None:
    lax = StageSettings(**{**SETTINGS.__dict__, "require_signed": False})
    staged = car.stage(car.bundle(sign=False), lax)
    assert staged.signer_key_id is None and staged.trust_entry is None
    skipped = [(step, detail["warning"]) for step, detail in car.steps if detail["status"] == "skipped"]
    assert [step for step, _ in skipped] == ["signature", "key_validity"] and "UNSIGNED" in skipped[0][1]
    bundle = car.bundle("tampered")  # a signature that is there must still verify
    (bundle / "manifest.json").write_text((bundle / "manifest.json").read_text() + " ")
    car.store.discard_staged()
    assert car.refused(bundle, lax).step == "signature"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def test_a_bundle_from_a_url(car: Car, web: tuple[str, Path]) -> None:
    url, root = web
    archive = pack_tar(car.bundle(), root / "pilot-1.0.0.tar")
    digest, size = hashlib.sha256(archive.read_bytes()).hexdigest(), archive.stat().st_size
    downloads = car.tmp / "downloads"
    staged = stage_url(f"{url}/pilot-1.0.0.tar", sha256=digest, size=size, downloads=downloads, store=car.store,
                       trust=TrustStore.load(car.trust_dir), settings=SETTINGS,
                       on_step=lambda step, detail: car.steps.append((step, detail)))
    assert staged.sha256 == MODEL_SHA256 and list(downloads.iterdir()) == []  # the download is not kept
    assert car.statuses()[:3] == [("fetch", "started"), ("fetch", "passed"), ("unpack", "started")]
    progress = [detail for step, detail in car.steps if detail["status"] == "progress"]
    assert progress and progress[-1]["bytes"] == size == progress[-1]["total"]
    with pytest.raises(StageError) as caught:
        stage_url(f"{url}/pilot-1.0.0.tar", sha256="0" * 64, size=size, downloads=downloads, store=car.store,
                  trust=TrustStore.load(car.trust_dir), settings=SETTINGS)
    assert caught.value.step == "fetch" and "is not the announced" in str(caught.value)


def test_the_inbox_lists_finished_drops_oldest_first(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for index, name in enumerate(["b.tar.gz", "a.tar", ".c.tar", "d.tar.part", "notes.txt", "e.tgz"]):
        (inbox / name).write_bytes(b"x")
        import os

        os.utime(inbox / name, (1000 + index, 1000 + index))
    assert [path.name for path in inbox_bundles(inbox)] == ["b.tar.gz", "a.tar", "e.tgz"]
    assert inbox_bundles(tmp_path / "nowhere") == []


# -- configuration -----------------------------------------------------------------------------------
def config_with(tmp_path: Path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load(path), path


@pytest.mark.parametrize(("text", "expected"), [
    ("[models]\nmax_bundle_mb = 0\n", "models.max_bundle_mb: Input should be greater than 0"),
    ("[models]\ntrust_dirr = '/etc'\n", "models.trust_dirr: unknown key"),
    ("[models]\nrequire_signed = 'maybe'\n", "models.require_signed: Input should be a valid boolean"),
    ("[models]\ndownload_attempts = 0\n", "models.download_attempts: Input should be greater than or equal to 1"),
    ("[models]\nsmoke_budget_ms = -1\n", "models.smoke_budget_ms: Input should be greater than 0"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_with(tmp_path, text)
    assert f"{tmp_path / 'agent.toml'}: {expected}" in str(caught.value)


def test_config_values_reach_the_pipeline(tmp_path: Path) -> None:
    config, _ = config_with(tmp_path, "[models]\nmax_bundle_mb = 8\nkeep_free_mb = 1\nread_timeout_s = 3\n"
                                      "smoke_budget_ms = 25\nrequire_signed = false\n")
    settings = settings_from_config(config)
    assert settings.max_bytes == settings.limits.max_bytes == 8 * 1024 * 1024
    assert settings.limits.keep_free_bytes == 1024 * 1024 and settings.limits.read_timeout_s == 3.0
    assert settings.smoke_budget_ms == 25.0 and settings.require_signed is False
    defaults, _ = config_with(tmp_path, "")
    assert defaults.models.require_signed is True
    assert defaults.models.trust_dir == Path("/etc/donkey-agent/trusted-keys")
    assert store_root(defaults).parts[-3:] == ("donkey-agent", "default-car", "models")  # in the state directory
