"""Runtime-policy fragments from `donkey-agent attest policy`, validated by Keylime's own code (keylime 7.14.3).

IMA logs are synthetic but built as the kernel builds them (reference §6): ima-ng and ima-sig template data, the
golden boot_aggregate vector, and PCR 10 replayed so Keylime's pcr check runs too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.attest import imalog, policy
from agent.cli import main as cli_main
from tests.keylime_inproc import keylime_ima

GOLDEN_BOOT_AGGREGATE = "0adefe762c149c7cec19da62f0da1297fcfbffff"


def test_golden_boot_aggregate_vector():
    entry = imalog.boot_aggregate()
    assert entry.template_hash == GOLDEN_BOOT_AGGREGATE
    assert entry.line() == f"10 {GOLDEN_BOOT_AGGREGATE} ima-ng sha256:{'0' * 64} boot_aggregate"
    assert imalog.parse_line(entry.line()) == entry


@pytest.mark.parametrize("template", ["ima-ng", "ima-sig"])
def test_lines_round_trip_and_detect_tampering(template):
    entry = imalog.entry(hashlib.sha256(b"model").digest(), "/opt/donkey/models/my pilot.tflite",
                         template=template, signature=bytes.fromhex("030204aabbccdd0002beef") if template == "ima-sig"
                         else b"")
    parsed = imalog.parse_line(entry.line())
    assert parsed == entry and parsed.consistent
    tampered = entry.line().replace("pilot", "pilo7")
    assert not imalog.parse_line(tampered).consistent


def test_unsigned_ima_sig_line_ends_in_an_empty_field():
    entry = imalog.entry(bytes(32), "/x", template="ima-sig")
    assert entry.line().endswith("/x ")  # the kernel prints the separator before the empty sig field
    assert imalog.parse_line(entry.line()).signature == b""


@pytest.mark.parametrize("line", ["", "10 abc ima-ng", "10 " + "0" * 40 + " ima sha1:00 /x",
                                  "x " + "0" * 40 + " ima-ng sha256:00 /x", "10 " + "0" * 40 + " ima-ng sha256:zz /x",
                                  "10 " + "0" * 40 + " ima-sig sha256:00 /x zz"])
def test_malformed_lines_are_refused(line):
    with pytest.raises(imalog.ImaLogError):
        imalog.parse_line(line)


@pytest.fixture
def install(tmp_path):
    """A fake installed agent package, an active and a staged model directory."""
    package = tmp_path / "site" / "agent"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = 1\n")
    (package / "run.py").write_text("print('drive')\n")
    (package / "__pycache__" / "run.cpython-311.pyc").write_bytes(b"\x00pyc")
    (package / "README.txt").write_text("not code")
    active = tmp_path / "models" / "active"
    staged = tmp_path / "models" / "staged"
    active.mkdir(parents=True)
    staged.mkdir(parents=True)
    (active / "pilot.tflite").write_bytes(b"TFL3 active model")
    (staged / "pilot.tflite").write_bytes(b"TFL3 staged model")
    return package, active, staged


def _log(files: list[Path], template: str, extra: list[imalog.Entry] = ()) -> list[imalog.Entry]:
    entries = [imalog.boot_aggregate(template=template)]
    entries += [imalog.entry(hashlib.sha256(path.read_bytes()).digest(), str(path.resolve()), template=template)
                for path in files]
    return entries + list(extra)


def _validate(fragment: dict, entries: list[imalog.Entry], pcr: bytes | None = None):
    ima = keylime_ima()
    from keylime.common.algorithms import Hash

    ima.validate_runtime_policy(fragment)
    pcr_value = (pcr if pcr is not None else imalog.extend(bytes(32), entries)).hex()
    lines = [entry.line() for entry in entries]
    running, failure = ima.process_measurement_list(None, lines, json.loads(json.dumps(fragment)),
                                                    pcrval=pcr_value, hash_alg=Hash.SHA256)
    return running, failure


def _event_ids(failure) -> set[str]:
    return {event.event_id for event in failure.events}


def test_cli_prints_a_policy_keylime_accepts(install, tmp_path, capsys, monkeypatch):
    package, active, staged = install
    ima_log = tmp_path / "ascii_runtime_measurements"
    ima_log.write_text(imalog.boot_aggregate().line() + "\n")
    monkeypatch.setattr(policy, "for_agent", _for_fake_package(policy.for_agent, package))
    code = cli_main(["attest", "policy", "--model", str(active), "--model", str(staged), "--release", "7",
                     "--ima-log", str(ima_log)])
    assert code == 0
    fragment = json.loads(capsys.readouterr().out)
    assert set(fragment) == {"meta", "release", "digests", "excludes", "keyrings", "ima", "ima-buf",
                             "verification-keys"}
    assert fragment["release"] == 7 and fragment["meta"]["generator"] == 3
    assert fragment["digests"]["boot_aggregate"] == ["0" * 64]
    assert str((package / "__pycache__" / "run.cpython-311.pyc").resolve()) in fragment["digests"]
    assert str((package / "README.txt").resolve()) not in fragment["digests"]
    files = [package / "__init__.py", package / "run.py", active / "pilot.tflite", staged / "pilot.tflite"]
    _running, failure = _validate(fragment, _log(files, "ima-ng"))
    assert not failure, _event_ids(failure)


def _for_fake_package(real, package):
    def for_agent(models, **kwargs):
        return real(models, package_dir=package, **kwargs)
    return for_agent


@pytest.mark.parametrize("template", ["ima-ng", "ima-sig"])
def test_listed_model_passes(install, template):
    package, active, staged = install
    fragment = policy.for_agent([active, staged], package_dir=package, release=1)
    fragment["digests"]["boot_aggregate"] = ["0" * 64]
    _, failure = _validate(fragment, _log([package / "run.py", active / "pilot.tflite"], template))
    assert not failure, _event_ids(failure)


@pytest.mark.parametrize("template", ["ima-ng", "ima-sig"])
def test_unlisted_model_fails(install, tmp_path, template):
    package, active, _ = install
    fragment = policy.for_agent([active], package_dir=package)
    fragment["digests"]["boot_aggregate"] = ["0" * 64]
    # A different model under the listed path (installed without the fleet's policy update): hash mismatch.
    swapped = imalog.entry(hashlib.sha256(b"another model").digest(), str((active / "pilot.tflite").resolve()),
                           template=template)
    _, failure = _validate(fragment, _log([package / "run.py"], template, [swapped]))
    assert failure and "ima.validation.ima-ng.runtime_policy_hash" in _event_ids(failure)
    # A model at a path the policy never listed.
    other = tmp_path / "elsewhere.tflite"
    other.write_bytes(b"unlisted")
    _, failure = _validate(fragment, _log([package / "run.py", other], template))
    assert failure and "ima.validation.ima-ng.not_in_allowlist" in _event_ids(failure)


def test_tampered_entry_fails(install):
    package, active, _ = install
    fragment = policy.for_agent([active], package_dir=package)
    fragment["digests"]["boot_aggregate"] = ["0" * 64]
    entries = _log([package / "run.py", active / "pilot.tflite"], "ima-ng")
    honest_pcr = imalog.extend(bytes(32), entries)
    model = entries[-1]
    # The log claims the listed digest, but the kernel extended PCR 10 with what was really read.
    really_read = imalog.entry(hashlib.sha256(b"tampered model").digest(), model.path)
    quoted = imalog.extend(bytes(32), [*entries[:-1], really_read])
    _, failure = _validate(fragment, entries, pcr=quoted)
    assert failure and "ima.pcr_mismatch" in _event_ids(failure)
    # A line edited after the fact (digest changed, template hash kept): Keylime's own parser refuses it.
    forged = model.line().replace(model.digest.hex(), hashlib.sha256(b"x").hexdigest())
    ima = keylime_ima()
    from keylime.common.algorithms import Hash

    _, failure = ima.process_measurement_list(None, [e.line() for e in entries[:-1]] + [forged], fragment,
                                              pcrval=honest_pcr.hex(), hash_alg=Hash.SHA256)
    assert failure and "ima.validation.ima_hash" in _event_ids(failure)  # the template hash no longer matches
    # And the untampered log against the honest PCR passes (the two failures above are the tampering).
    _, failure = _validate(fragment, entries, pcr=honest_pcr)
    assert not failure, _event_ids(failure)


def test_paths_are_canonical(install, tmp_path):
    _package, active, _ = install
    link = tmp_path / "current"
    link.symlink_to(active)
    fragment = policy.build([link / "pilot.tflite"], timestamp="t")
    assert list(fragment["digests"]) == [str((active / "pilot.tflite").resolve())]


def test_missing_model_is_an_error(install, tmp_path):
    package, _, _ = install
    with pytest.raises(FileNotFoundError):
        policy.for_agent([tmp_path / "nope.tflite"], package_dir=package)
