"""``donkey-agent``: the car's command line. Later issues add `run`, `doctor` and `model check`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="donkey-agent", description="The DonkeyCar edge agent.")
    parser.add_argument("--version", action="version", version=f"donkey-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    tub = commands.add_parser("tub", help="inspect DonkeyCar Tub v2 datasets")
    tub_commands = tub.add_subparsers(dest="tub_command", required=True)
    info = tub_commands.add_parser("info", help="records, sessions and inputs of a tub")
    info.add_argument("path", type=Path)
    return parser


def tub_info(path: Path) -> dict[str, object]:
    """What a tub holds, read from its manifest (the same five lines DonkeyCar reads)."""
    manifest = path / "manifest.json"
    lines = manifest.read_text(encoding="utf-8").splitlines()
    if len(lines) < 5:
        raise ValueError(f"{manifest}: expected 5 lines, found {len(lines)}")
    inputs, types, metadata, manifest_metadata, catalogs = (json.loads(line) for line in lines[:5])
    sessions = manifest_metadata.get("sessions", {})
    return {
        "path": str(path.resolve()),
        "records": catalogs["current_index"] - len(catalogs["deleted_indexes"]),
        "deleted": len(catalogs["deleted_indexes"]),
        "catalogs": len(catalogs["paths"]),
        "sessions": sessions.get("all_full_ids", []),
        "inputs": dict(zip(inputs, types, strict=True)),
        "metadata": metadata,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tub":
        try:
            print(json.dumps(tub_info(args.path), indent=2))
        except (OSError, ValueError, KeyError) as exc:
            print(f"donkey-agent tub info: {args.path}: not a readable Tub v2 ({exc})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
