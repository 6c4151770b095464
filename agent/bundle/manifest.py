"""``manifest.json``: what a bundle says about its model, checked strictly.

The manifest is signed with the model, so once the signature verifies it is the build side's word
on what the model is (name, version, kind, input shape), where it came from (training data digests,
the training command, DonkeyCar's version, how it drove the twin) and what it needs (the minimum
agent version). Parsing is strict (unknown keys, wrong types and naive times are errors), because a
field the car silently ignores is a promise nobody checks. Errors name the field:
``manifest.json: provenance.twin_evaluation.0.laps: Input should be greater than or equal to 0``.

Parsed only after the signature verified (see ``stage``): the car never acts on an unsigned claim.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.bundle.errors import ManifestError

MANIFEST_FILE = "manifest.json"
FORMAT = "donkey-model-bundle/1"
MAX_MANIFEST_BYTES = 256 * 1024  # a manifest is a few kB; a huge one is a mistake or an attack

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# Release numbers only (1, 1.2, 1.2.3): compared numerically with the agent's own release.
AgentVersion = Annotated[str, StringConstraints(pattern=r"^\d+(\.\d+){0,2}$")]
ModelFileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.tflite$")]
Kind = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]  # checked against the runtime's kinds later
Text = Annotated[str, StringConstraints(min_length=1, max_length=2000)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataDigest(Strict):
    """One training dataset (a tub), named and pinned by digest."""

    name: Text
    sha256: Sha256
    records: Count | None = None


class TwinEvaluation(Strict):
    """How the model drove the twin, closed loop, before it was signed."""

    track: Text
    laps: Count
    off_track_events: Count
    mean_abs_cte: NonNegative  # metres
    max_abs_cte: NonNegative

    @model_validator(mode="after")
    def _mean_within_max(self) -> TwinEvaluation:
        if self.mean_abs_cte > self.max_abs_cte:
            raise ValueError(f"mean_abs_cte ({self.mean_abs_cte}) is above max_abs_cte ({self.max_abs_cte})")
        return self


class Provenance(Strict):
    """Where the model came from. Every field may be empty for a hand-packed model; ``pack`` says so."""

    training_data: list[DataDigest] = []
    training_command: Text | None = None
    donkeycar_version: Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z.+-]{1,32}$")] | None = None
    twin_evaluation: list[TwinEvaluation] = []


class ModelFile(Strict):
    """The ``.tflite`` in the bundle: its file name (no directories) and what its bytes must hash to."""

    file: ModelFileName
    sha256: Sha256
    bytes: Annotated[int, Field(gt=0)]


class Manifest(Strict):
    format: Literal["donkey-model-bundle/1"]
    name: Name
    version: Version
    kind: Kind
    input_shape: tuple[Annotated[int, Field(gt=0, le=4096)], Annotated[int, Field(gt=0, le=4096)], Literal[1, 3]]
    created: AwareDatetime
    min_agent_version: AgentVersion
    model: ModelFile
    provenance: Provenance = Provenance()

    @field_validator("created")
    @classmethod
    def _utc(cls, value: datetime.datetime) -> datetime.datetime:
        if value.utcoffset() != datetime.timedelta(0):
            raise ValueError(f"must be in UTC (ends in Z), got offset {value.utcoffset()}")
        return value


def format_errors(error: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: message``."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (a newer bundle format, or a typo)"
        elif item["type"] == "missing":
            message = "required field is missing"
        problems.append(f"{source}: {field}: {message}")
    return "\n".join(problems)


def parse_manifest(data: bytes, source: str = MANIFEST_FILE) -> Manifest:
    """Parse and check manifest bytes; raises ManifestError naming each bad field."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")
    try:
        json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{source}: not valid JSON: {exc}") from None
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise ManifestError(format_errors(exc, source)) from None


def read_manifest(bundle: Path) -> Manifest:
    path = bundle / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest.json in the bundle") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_manifest(data, MANIFEST_FILE)


def dump_manifest(manifest: Manifest) -> bytes:
    """Stable bytes (sorted keys, two-space indent, final newline): the same manifest signs the same."""
    data = manifest.model_dump(mode="json")
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``0.1.0+source`` -> (0, 1, 0); no leading digits -> (0,)."""
    match = re.match(r"^\d+(\.\d+)*", version)
    parts = tuple(int(part) for part in match.group(0).split(".")) if match else (0,)
    return parts + (0,) * (3 - len(parts))


def agent_satisfies(min_agent_version: str, agent_version: str) -> bool:
    """Whether an agent of ``agent_version`` meets a bundle's ``min_agent_version`` (release numbers only)."""
    return release(agent_version) >= release(min_agent_version)
