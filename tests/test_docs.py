"""The documentation's claims that code can check: the config reference in docs/operating.md."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, validate

DOC = Path(__file__).resolve().parents[1] / "docs" / "operating.md"


def flat(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= flat(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_the_documented_config_is_valid_and_covers_every_key() -> None:
    block, = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    documented = tomllib.loads(block)
    validate(documented, str(DOC))  # every documented key exists, with a valid value
    commented = set(re.findall(r"^# ?([a-z_]+) = ", block, re.M))  # optional keys shown commented out
    every = flat(AgentConfig().model_dump(mode="json", exclude={"source"}))
    missing = sorted(key for key in every - flat(documented) if key.rsplit(".", 1)[-1] not in commented)
    assert not missing, f"config keys not in docs/operating.md: {missing}"
