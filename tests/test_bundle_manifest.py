"""manifest.json: strict, and every error names the field."""

from __future__ import annotations

import json

import pytest

from agent.bundle.errors import ManifestError
from agent.bundle.manifest import agent_satisfies, dump_manifest, parse_manifest, release
from tests.bundles import MODEL_SHA256, manifest_data


def parse(**overrides: object):
    return parse_manifest(json.dumps(manifest_data(**overrides)).encode())


def test_a_full_manifest_parses_and_dumps_stably() -> None:
    manifest = parse()
    assert manifest.name == "pilot" and manifest.kind == "linear" and manifest.input_shape == (120, 160, 3)
    assert manifest.model.sha256 == MODEL_SHA256
    assert manifest.provenance.twin_evaluation[0].off_track_events == 0
    assert manifest.provenance.training_data[0].records == 4000
    once = dump_manifest(manifest)
    assert dump_manifest(parse_manifest(once)) == once
    assert b'"created": "2026-12-01T12:00:00Z"' in once


def test_provenance_may_be_left_out() -> None:
    data = manifest_data()
    del data["provenance"]
    manifest = parse_manifest(json.dumps(data).encode())
    assert manifest.provenance.training_data == [] and manifest.provenance.training_command is None


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"extra": 1}, "manifest.json: extra: unknown field"),
    ({"name": "../evil"}, "manifest.json: name: String should match pattern"),
    ({"version": ""}, "manifest.json: version: String should match pattern"),
    ({"created": "2026-12-01T12:00:00"}, "manifest.json: created: Input should have timezone info"),
    ({"created": "2026-12-01T12:00:00+02:00"}, "manifest.json: created: Value error, must be in UTC"),
    ({"input_shape": [120, 160, 4]}, "manifest.json: input_shape.2: Input should be 1 or 3"),
    ({"input_shape": [120, "160", 3]}, "manifest.json: input_shape.1: Input should be a valid integer"),
    ({"min_agent_version": "0.1.0rc1"}, "manifest.json: min_agent_version: String should match pattern"),
    ({"format": "donkey-model-bundle/2"}, "manifest.json: format: Input should be 'donkey-model-bundle/1'"),
    ({"model": {"file": "sub/pilot.tflite", "sha256": MODEL_SHA256, "bytes": 1}},
     "manifest.json: model.file: String should match pattern"),
    ({"model": {"file": "pilot.tflite", "sha256": MODEL_SHA256.upper(), "bytes": 1}},
     "manifest.json: model.sha256: String should match pattern"),
    ({"model": {"file": "pilot.tflite", "sha256": MODEL_SHA256}},
     "manifest.json: model.bytes: required field is missing"),
    ({"provenance": {"twin_evaluation": [{"track": "t", "laps": -1, "off_track_events": 0, "mean_abs_cte": 0.0,
                                          "max_abs_cte": 0.0}]}},
     "manifest.json: provenance.twin_evaluation.0.laps: Input should be greater than or equal to 0"),
    ({"provenance": {"twin_evaluation": [{"track": "t", "laps": 1, "off_track_events": 0, "mean_abs_cte": 0.5,
                                          "max_abs_cte": 0.1}]}},
     "manifest.json: provenance.twin_evaluation.0: Value error, mean_abs_cte (0.5) is above max_abs_cte (0.1)"),
    ({"provenance": {"training_data": [{"name": "tub", "sha256": "nope"}]}},
     "manifest.json: provenance.training_data.0.sha256: String should match pattern"),
    ({"provenance": {"training_commandd": "x"}}, "manifest.json: provenance.training_commandd: unknown field"),
])
def test_errors_name_the_field(overrides: dict[str, object], expected: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse(**overrides)
    assert expected in str(caught.value)


def test_missing_fields_are_each_named() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(b'{"format": "donkey-model-bundle/1"}')
    for field in ("name", "version", "kind", "input_shape", "created", "min_agent_version", "model"):
        assert f"manifest.json: {field}: required field is missing" in str(caught.value)


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe", b"[]", b"x" * 300_000])
def test_not_a_manifest(data: bytes) -> None:
    with pytest.raises(ManifestError, match=r"manifest\.json"):
        parse_manifest(data)


def test_agent_version_comparison_uses_release_numbers() -> None:
    assert release("0.1.0+source") == (0, 1, 0) and release("2") == (2, 0, 0) and release("dev") == (0, 0, 0)
    assert agent_satisfies("0.1.0", "0.1.0") and agent_satisfies("0.1", "0.1.3") and agent_satisfies("0.9", "0.10.0")
    assert not agent_satisfies("0.2.0", "0.1.9") and not agent_satisfies("1", "0.99.99")
