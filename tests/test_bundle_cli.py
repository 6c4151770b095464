"""`donkey-agent model pack|sign|verify|install|list|rollback` as an operator runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.bundle.archive import pack_tar
from agent.bundle.stage import store_root
from agent.bundle.store import ModelStore
from agent.cli import main
from agent.config import load
from tests.bundles import MODEL, MODEL_SHA256, ROOT, make_key

PROVENANCE = {
    "training_data": [{"name": "tub_generated_track_11", "sha256": "b" * 64, "records": 4200}],
    "training_command": "python models/train.py --epochs 20", "donkeycar_version": "5.3.0",
    "twin_evaluation": [{"track": "generated_track", "laps": 3, "off_track_events": 0, "mean_abs_cte": 0.0025,
                         "max_abs_cte": 0.0084}],
}


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    trust = tmp_path / "trusted-keys"
    trust.mkdir()
    private, public = make_key(tmp_path, "fleet-2026")
    (trust / "fleet-2026.pem").write_bytes(public.read_bytes())
    (trust / "fleet-2026.toml").write_text("not_after = 2099-01-01T00:00:00Z\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'[models]\ntrust_dir = "{trust}"\nstore = "{tmp_path / "models"}"\nsmoke_budget_ms = 500\n')
    provenance = tmp_path / "provenance.json"
    provenance.write_text(json.dumps(PROVENANCE))
    return {"tmp": tmp_path, "trust": trust, "private": private, "public": public, "config": config,
            "provenance": provenance}


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main(["model", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def packed_and_signed(capsys: pytest.CaptureFixture[str], setup: dict[str, Path], version: str) -> Path:
    bundle = setup["tmp"] / f"pilot-{version}"
    code, out, err = run(capsys, "pack", bundle, "--model", MODEL, "--name", "pilot", "--version", version,
                         "--provenance", setup["provenance"])
    assert code == 0, err
    assert f"packed pilot {version} (linear, 120x160x3)" in out and "provenance: none" not in out
    code, out, err = run(capsys, "sign", bundle, "--key", setup["private"])
    assert code == 0, err
    assert f"signed pilot {version}: {bundle / 'model.sig'}" in out
    return bundle


def test_pack_sign_verify_install_list_rollback(capsys: pytest.CaptureFixture[str], setup: dict[str, Path]) -> None:
    first = packed_and_signed(capsys, setup, "1.0.0")
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["provenance"] == PROVENANCE and manifest["model"]["sha256"] == MODEL_SHA256
    code, out, _ = run(capsys, "verify", first, "--trust", setup["trust"])
    assert code == 0 and "verified: pilot 1.0.0, signed by fleet-2026" in out
    assert "key_validity   passed  fleet-2026 valid until 2099-01-01" in out
    code, out, err = run(capsys, "install", first, "--config", setup["config"])
    assert code == 0, err
    assert "smoke          passed  invoke p50" in out and "staged: pilot 1.0.0" in out
    store = ModelStore(store_root(load(setup["config"])))
    store.promote()  # activation belongs to the daemon; the store does it directly here
    second = packed_and_signed(capsys, setup, "2.0.0")
    code, out, err = run(capsys, "install", pack_tar(second, setup["tmp"] / "pilot-2.0.0.tar.gz"), "--config",
                         setup["config"], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["version"] == "2.0.0" and report["steps"][0]["step"] == "unpack"
    store.promote()
    code, out, _ = run(capsys, "list", "--config", setup["config"], "--json")
    slots = json.loads(out)["slots"]
    assert (slots["active"]["version"], slots["previous"]["version"], slots["staged"]) == ("2.0.0", "1.0.0", None)
    code, out, _ = run(capsys, "rollback", "--config", setup["config"])
    assert code == 0 and "rolled back: active is now pilot 1.0.0" in out
    code, out, _ = run(capsys, "list", "--config", setup["config"])
    assert "active    pilot 1.0.0  linear" in out and "previous  (empty)" in out
    code, _, err = run(capsys, "rollback", "--config", setup["config"])
    assert code == 1 and "no previous model to roll back to" in err


def test_refusals_say_where_and_why(capsys: pytest.CaptureFixture[str], setup: dict[str, Path]) -> None:
    bundle = packed_and_signed(capsys, setup, "1.0.0")
    with (bundle / "manifest.json").open("a") as handle:
        handle.write(" ")
    code, out, err = run(capsys, "verify", bundle, "--key", setup["public"])
    assert code == 1 and "donkey-agent model verify: signature:" in err and "changed: manifest.json" in err
    code, out, err = run(capsys, "install", bundle, "--config", setup["config"], "--json")
    report = json.loads(out)
    assert code == 1 and (report["ok"], report["step"], report["reason"]) == (False, "signature", "tampered")
    assert "refused at signature" in err
    _, stranger = make_key(setup["tmp"], "stranger")
    (bundle / "manifest.json").write_text((bundle / "manifest.json").read_text().rstrip(" "))
    assert run(capsys, "verify", bundle, "--key", setup["public"])[0] == 0  # restored: verifies again
    code, _, err = run(capsys, "verify", bundle, "--key", stranger)
    assert code == 1 and "which is not in the trust store" in err and "stranger (key" in err


def test_pack_refusals(capsys: pytest.CaptureFixture[str], setup: dict[str, Path]) -> None:
    tmp = setup["tmp"]
    (tmp / "cut.tflite").write_bytes(MODEL.read_bytes()[:1000])
    code, _, err = run(capsys, "pack", tmp / "a", "--model", tmp / "cut.tflite", "--name", "p", "--version", "1")
    assert code == 65 and "the car cannot run this model" in err
    code, _, err = run(capsys, "pack", tmp / "b", "--model", MODEL, "--name", "../p", "--version", "1")
    assert code == 1 and "name: String should match pattern" in err
    code, _, err = run(capsys, "pack", tmp / "c", "--model", MODEL, "--name", "p", "--version", "1",
                       "--provenance", '{"twin_evaluation": [{"track": "t", "laps": "3"}]}')
    assert code == 1 and "--provenance: twin_evaluation.0.laps: Input should be a valid integer" in err
    assert "--provenance: twin_evaluation.0.off_track_events: required field is missing" in err
    (tmp / "d").mkdir()
    (tmp / "d" / "x").write_text("x")
    code, _, err = run(capsys, "pack", tmp / "d", "--model", MODEL, "--name", "p", "--version", "1")
    assert code == 1 and "not empty" in err


def test_sign_refuses_a_bundle_whose_model_changed_after_packing(capsys: pytest.CaptureFixture[str],
                                                                 setup: dict[str, Path]) -> None:
    bundle = setup["tmp"] / "b"
    assert run(capsys, "pack", bundle, "--model", MODEL, "--name", "p", "--version", "1")[0] == 0
    with (bundle / MODEL.name).open("ab") as handle:
        handle.write(b"x")
    code, _, err = run(capsys, "sign", bundle, "--key", setup["private"])
    assert code == 1 and "pack the bundle again" in err and not (bundle / "model.sig").exists()


def test_config_errors_exit_78(capsys: pytest.CaptureFixture[str], setup: dict[str, Path]) -> None:
    setup["config"].write_text("[models]\nmax_bundle_mb = -5\n")
    code, _, err = run(capsys, "install", setup["tmp"], "--config", setup["config"])
    assert code == 78 and "models.max_bundle_mb: Input should be greater than 0" in err


def test_the_installed_command(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bundle = packed_and_signed(capsys, setup, "1.0.0")
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "donkey-agent"), "model", "verify", str(bundle), "--key",
                             str(setup["public"]), "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["trust_entry"] == "fleet-2026" and report["sha256"] == MODEL_SHA256
