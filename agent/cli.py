"""``donkey-agent``: the car's command line. Later issues add `run`, `doctor` and `model check`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__
from agent.config import DEFAULT_PATH, ConfigError, config_path, load
from agent.core.control import MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="donkey-agent", description="The DonkeyCar edge agent.")
    parser.add_argument("--version", action="version", version=f"donkey-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="drive: camera -> autopilot -> actuators, until Ctrl-C or SIGTERM")
    run.add_argument("--config", type=Path, help=f"config file (default: {DEFAULT_PATH} if it exists)")
    run.add_argument("--sim", metavar="HOST:PORT", help="drive a Donkey simulator (the twin) instead of hardware")
    run.add_argument("--model", type=Path, help="autopilot .tflite (overrides autopilot.model)")
    run.add_argument("--mode", choices=MODES, help="start-up mode (overrides drive.mode)")
    run.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    run.add_argument("--record", type=Path, metavar="DIR", help="record a DonkeyCar tub while driving")
    run.add_argument("--max-throttle", type=float, help="overrides drive.max_throttle")
    run.add_argument("--mqtt", metavar="URL", help="fleet broker, mqtt://host:port or mqtts://host:port")
    run.add_argument("--car-id", help="this car's id in the fleet topics (overrides telemetry.car_id)")
    run.add_argument("--fleet", help="fleet name in the topics (overrides telemetry.fleet)")
    run.add_argument("-v", "--verbose", action="store_true")
    model = commands.add_parser("model", help="autopilot models")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    check = model_commands.add_parser("check", help="load a model as the car would; kind, I/O, timing, outputs")
    check.add_argument("model", type=Path)
    check.add_argument("--images", type=Path, help="an (N, 120, 160, 3) uint8 .npy array to run through the model")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--kind", default="auto", help="override the kind detected from the signature")
    _add_bundle_commands(model_commands)
    stop = commands.add_parser("safe-stop", help="put the configured actuators in neutral (systemd ExecStopPost)")
    stop.add_argument("--config", type=Path, help=f"config file (default: {DEFAULT_PATH} if it exists)")
    doctor = commands.add_parser("doctor", help="check this car: config, devices, permissions, real time, model")
    doctor.add_argument("--config", type=Path, help=f"config file (default: {DEFAULT_PATH} if it exists)")
    estop = commands.add_parser("estop", help="e-stop the running agent on this machine (sends it SIGUSR1)")
    estop.add_argument("--config", type=Path, help=f"config file (default: {DEFAULT_PATH} if it exists)")
    faults = commands.add_parser("faults", help="the latched faults kept across restarts; clear them while stopped")
    faults.add_argument("action", nargs="?", choices=("show", "clear"), default="show")
    faults.add_argument("fault", nargs="*", help="faults to clear (default: all)")
    faults.add_argument("--config", type=Path, help=f"config file (default: {DEFAULT_PATH} if it exists)")
    imp = commands.add_parser("import-calibration",
                              help="print the [actuators] section for a calibrated DonkeyCar's myconfig.py")
    imp.add_argument("myconfig", type=Path)
    tub = commands.add_parser("tub", help="inspect DonkeyCar Tub v2 datasets")
    tub_commands = tub.add_subparsers(dest="tub_command", required=True)
    info = tub_commands.add_parser("info", help="records, sessions and inputs of a tub")
    info.add_argument("path", type=Path)
    from agent.attest.commands import add_parser as add_attest_parser

    add_attest_parser(commands)
    return parser


def _add_bundle_commands(model_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`model pack|sign|verify|install|list|rollback`: signed bundles (docs/models.md)."""
    config_help = f"config file (default: {DEFAULT_PATH} if it exists)"
    pack = model_commands.add_parser("pack", help="make a bundle directory: the model (checked) and its manifest")
    pack.add_argument("directory", type=Path, help="the bundle directory to create (new or empty)")
    pack.add_argument("--model", type=Path, required=True, help="the .tflite to pack")
    pack.add_argument("--name", required=True, help="the model's name (letters, digits, . _ -)")
    pack.add_argument("--version", required=True, help="the model's version, e.g. 2026.12.06")
    pack.add_argument("--provenance", metavar="JSON", help="a JSON file (or inline JSON) of training_data, "
                      "training_command, donkeycar_version, twin_evaluation")
    pack.add_argument("--kind", default="auto", help="override the kind detected from the signature")
    pack.add_argument("--min-agent-version", help="oldest donkey-agent that may run it (default: this one)")
    pack.add_argument("--json", action="store_true")
    sign = model_commands.add_parser("sign", help="sign a bundle (OpenSSF Model Signing): writes BUNDLE/model.sig")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the ECDSA private key (PEM)")
    sign.add_argument("--certificate", type=Path, help="sign with this certificate for --key (PKI fleets)")
    sign.add_argument("--chain", type=Path, nargs="*", default=[], help="intermediate certificates (PEM)")
    sign.add_argument("--password-env", metavar="VAR", help="environment variable holding the key's password")
    sign.add_argument("--json", action="store_true")
    verify = model_commands.add_parser("verify", help="check a bundle's signature, manifest and digests")
    verify.add_argument("bundle", type=Path, help="a bundle directory or tar")
    trust = verify.add_mutually_exclusive_group()
    trust.add_argument("--trust", type=Path, metavar="DIR", help="trust store directory (default: models.trust_dir)")
    trust.add_argument("--key", type=Path, nargs="+", metavar="PEM", help="trust only these public keys or CAs")
    verify.add_argument("--config", type=Path, help=config_help)
    verify.add_argument("--json", action="store_true")
    install = model_commands.add_parser("install", help="verify, smoke-test and stage a bundle (dir, tar or URL)")
    install.add_argument("source", help="a bundle directory, a .tar/.tar.gz, or an http(s):// URL of one")
    install.add_argument("--sha256", help="the download's announced sha256 (URLs)")
    install.add_argument("--size", type=int, help="the download's announced size in bytes (URLs)")
    install.add_argument("--config", type=Path, help=config_help)
    install.add_argument("--json", action="store_true")
    for name, text in (("list", "the active, previous and staged models"),
                       ("rollback", "make the previous model active again")):
        command = model_commands.add_parser(name, help=text)
        command.add_argument("--config", type=Path, help=config_help)
        command.add_argument("--json", action="store_true")


def _model(args: argparse.Namespace) -> int:
    from agent.bundle import commands

    if args.model_command == "pack":
        return commands.pack(args.directory, args.model, name=args.name, version=args.version,
                             provenance=args.provenance, kind=args.kind, min_agent_version=args.min_agent_version,
                             as_json=args.json)
    if args.model_command == "sign":
        return commands.sign(args.bundle, key=args.key, certificate=args.certificate, chain=args.chain,
                             password_env=args.password_env, as_json=args.json)
    if args.model_command == "verify":
        return commands.verify(args.bundle, config_path=args.config, trust_dir=args.trust, keys=args.key or [],
                               as_json=args.json)
    if args.model_command == "install":
        return commands.install(args.source, config_path=args.config, sha256=args.sha256, size=args.size,
                                as_json=args.json)
    if args.model_command == "list":
        return commands.list_models(config_path=args.config, as_json=args.json)
    return commands.rollback(config_path=args.config, as_json=args.json)


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


def _store_has_model(config: object) -> bool:
    """Whether the signed-model store holds a model the car can start with (active, or a first staged one)."""
    from agent.bundle.errors import StoreError
    from agent.bundle.stage import store_root
    from agent.bundle.store import ModelStore

    try:
        store = ModelStore(store_root(config))  # type: ignore[arg-type]
        return store.slot("active") is not None or store.slot("staged") is not None
    except (StoreError, OSError):
        return False


def _run(args: argparse.Namespace) -> int:
    from agent.hw.donkeysim.client import SimError
    from agent.hw.errors import HardwareUnavailableError
    from agent.run import EXIT_CONFIG, EXIT_UNAVAILABLE, run
    from agent.service.logs import configure_logging

    configure_logging(args.verbose)
    path = config_path(args.config)
    try:
        config = load(path)
        overrides: dict[str, object] = {}
        if args.sim:
            host, _, port = args.sim.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--sim: expected HOST:PORT, got {args.sim!r}")
            overrides.update({"twin.host": host, "twin.port": int(port), "camera.backend": "twin",
                              "actuators.backend": "twin"})
        if args.model:
            overrides["autopilot.model"] = args.model
        if args.mode:
            overrides["drive.mode"] = args.mode
        if args.max_throttle is not None:
            overrides["drive.max_throttle"] = args.max_throttle
        for key, value in (("telemetry.url", args.mqtt), ("telemetry.car_id", args.car_id),
                           ("telemetry.fleet", args.fleet)):
            if value is not None:
                overrides[key] = value
        if overrides:
            config = config.with_overrides(overrides)
        if config.telemetry.url is not None:
            from agent.telemetry.topics import TopicError, Topics

            try:
                Topics(config.telemetry.fleet, config.telemetry.car_id)
            except TopicError as exc:
                raise ConfigError(f"{config.source}: {exc}") from None
        if config.attestation.require and config.telemetry.url is None:
            raise ConfigError(f"{config.source}: attestation.require: the fleet's tokens arrive over MQTT; set "
                              "telemetry.url (or --mqtt)")
        if config.drive.mode in ("local", "local_angle") and config.autopilot.model is None \
                and not _store_has_model(config):
            raise ConfigError(f"{config.source}: autopilot.model: mode {config.drive.mode!r} needs a model "
                              "(a signed bundle: donkey-agent model install; or --model PATH, or --mode user)")
    except ConfigError as exc:
        print(f"donkey-agent: invalid config:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return run(config, config_path=path, overrides=overrides, duration=args.duration, record=args.record)
    except (HardwareUnavailableError, SimError) as exc:
        print(f"donkey-agent: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command in ("safe-stop", "doctor"):
        path = config_path(args.config)
        if args.command == "doctor":
            from agent.service.doctor import FAIL, format_table, run_checks

            checks = run_checks(path)
            print(format_table(checks))
            return 1 if any(c.result == FAIL for c in checks) else 0
        from agent.service.safestop import safe_stop

        try:
            config = load(path)
        except ConfigError as exc:
            # Under systemd the agent has already reported the details; say them once.
            detail = f":\n{exc}" if sys.stderr.isatty() else " (the agent's log names the problem)"
            print(f"donkey-agent safe-stop: invalid config, so the actuators are unknown; nothing written{detail}",
                  file=sys.stderr)
            return 78
        code, text = safe_stop(config)
        print(text, file=sys.stderr if code else sys.stdout)
        return code
    if args.command in ("estop", "faults"):
        from agent.service.control import estop, faults

        path = config_path(args.config)
        try:
            config = load(path)
        except ConfigError as exc:
            print(f"donkey-agent {args.command}: invalid config:\n{exc}", file=sys.stderr)
            return 78
        code, text = estop(config) if args.command == "estop" else faults(config, args.action, args.fault)
        print(text, file=sys.stderr if code else sys.stdout)
        return code
    if args.command == "import-calibration":
        from agent.hw.donkeycar_import import DonkeyConfigError, import_myconfig, to_toml

        try:
            print(to_toml(import_myconfig(args.myconfig)), end="")
        except (DonkeyConfigError, OSError) as exc:
            print(f"donkey-agent import-calibration: {exc}", file=sys.stderr)
            return 78
        return 0
    if args.command == "model" and args.model_command != "check":
        return _model(args)
    if args.command == "model":
        from agent.pilot.check import main_check

        code, text = main_check(args.model, args.images, args.json, args.kind)
        print(text, file=sys.stderr if code else sys.stdout)
        return code
    if args.command == "attest":
        from agent.attest.commands import main as attest_main

        return attest_main(args)
    if args.command == "tub":
        if args.path.is_dir() and not (args.path / "manifest.json").exists():
            print(f"donkey-agent tub info: {args.path}: no records here (no manifest.json): nothing was recorded, "
                  "or the disk was full for the whole recording", file=sys.stderr)
            return 1
        try:
            print(json.dumps(tub_info(args.path), indent=2))
        except (OSError, ValueError, KeyError) as exc:
            print(f"donkey-agent tub info: {args.path}: not a readable Tub v2 ({exc})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
