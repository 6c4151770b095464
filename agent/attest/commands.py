"""``donkey-agent attest ...``: the attestation subcommands (kept here so agent/cli.py only wires them in)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.config import DEFAULT_PATH, ConfigError, config_path, load


def add_parser(commands: Any) -> None:
    """Add ``attest policy`` and ``attest check`` to the top-level subparsers."""
    attest = commands.add_parser("attest", help="Keylime/IMA attestation: the runtime-policy fragment, self-checks")
    attest_commands = attest.add_subparsers(dest="attest_command", required=True)
    policy = attest_commands.add_parser(
        "policy", help="print a Keylime runtime-policy fragment for this car's agent files and models")
    policy.add_argument("--config", type=Path, help=f"config file (default: {DEFAULT_PATH} if it exists)")
    policy.add_argument("--model", type=Path, action="append", default=[], metavar="PATH",
                        help="a model file or directory (active or staged); repeatable; adds to autopilot.model "
                             "and attestation.model_dirs")
    policy.add_argument("--path", type=Path, action="append", default=[], metavar="PATH",
                        help="any other file or directory the agent reads (e.g. its virtualenv); repeatable")
    policy.add_argument("--release", type=int, default=0, help="the policy's release number (default 0)")
    policy.add_argument("--ima-log", type=Path, metavar="PATH",
                        default=Path("/sys/kernel/security/ima/ascii_runtime_measurements"),
                        help="take boot_aggregate from this IMA list when readable (default: the kernel's)")
    check = attest_commands.add_parser("check", help="attestation self-checks: TPM, securityfs, IMA, Keylime agent")
    check.add_argument("--config", type=Path, help=f"config file (default: {DEFAULT_PATH} if it exists)")
    check.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"donkey-agent attest: invalid config:\n{exc}", file=sys.stderr)
        return 78
    models = [*([config.autopilot.model] if config.autopilot.model else []), *config.attestation.model_dirs,
              *getattr(args, "model", [])]
    if args.attest_command == "policy":
        from agent.attest.policy import for_agent

        try:
            fragment = for_agent(models, extra=args.path, release=args.release, measurements=args.ima_log)
        except OSError as exc:
            print(f"donkey-agent attest policy: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(fragment, indent=2))
        return 0
    import agent
    from agent.attest.selfcheck import run_all

    targets = [Path(agent.__file__).resolve().parent, *models]
    rows = run_all(targets, unit=config.attestation.keylime_unit)
    if args.json:
        print(json.dumps([row._asdict() for row in rows], indent=2))
    else:
        marks = {True: "ok", False: "FAIL", None: "?"}
        for row in rows:
            print(f"{marks[row.ok]:>4}  {row.name}: {row.detail}")
    return 1 if any(row.ok is False for row in rows) else 0
