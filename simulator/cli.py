"""``donkey-sim``: serve the twin, or drive it with the expert and record training data."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.hw.donkeysim import DEFAULT_PORT
from simulator.render import Randomization
from simulator.scenes import SCENES, scene_names
from simulator.track import DEFAULT_TRACK, get_track

COMMANDS = ("serve", "record", "drive", "tracks")


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        return number
    return parse


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return number


def _track(value: str) -> str:
    if value not in scene_names():
        raise argparse.ArgumentTypeError(f"unknown track {value!r}; choose from {', '.join(scene_names())}")
    return value


def _size(value: str) -> int:
    """WxH (a pixel budget per camera) -> its pixel count."""
    width, _, height = value.lower().partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) * int(height) < 64:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {value!r}")
    return int(width) * int(height)


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="donkey-sim",
        description="A headless digital twin that speaks the Donkey simulator protocol.",
        epilog="Without a command, serves the twin (same as `donkey-sim serve`).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="serve the twin over TCP (default)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 = any)")
    serve.add_argument("--track", type=_track, help="preload this scene, so clients get a car at once "
                       f"(default: start in the menu; scenes: {', '.join(scene_names())})")
    serve.add_argument("--seed", type=int, default=0, help="world seed (textures, noise)")
    serve.add_argument("--fps", type=_positive(float), default=20.0, help="telemetry rate per car (default 20)")
    serve.add_argument("--summary", type=Path, help="write a JSON drive summary here on exit and on SIGTERM")
    serve.add_argument("--duration", type=_positive(float), help="stop after this many seconds")
    serve.add_argument("--randomize", type=_non_negative, default=0.0, metavar="X",
                       help="domain randomisation strength 0..1 (lighting, texture, camera noise)")
    serve.add_argument("--time-scale", type=_positive(float), default=1.0, metavar="X",
                       help="simulated seconds per real second (default 1; >1 runs faster than real time)")
    serve.add_argument("--exit-on-quit", action="store_true", help="stop the twin when a client sends quit_app")
    serve.add_argument("--greeting-delay", type=_non_negative, default=0.05, metavar="SECONDS",
                       help="from a connection to its first message (default 0.05, about one frame, as Unity)")
    serve.add_argument("--max-connections", type=_positive(int), default=16, metavar="N",
                       help="connections served at once; more are closed at once (default 16)")
    serve.add_argument("--max-camera", type=_size, default=640 * 480, metavar="WxH",
                       help="pixel budget per camera; larger cam_config sizes are scaled down (default 640x480)")

    record = commands.add_parser("record", help="drive the expert in-process, as fast as possible, into a tub")
    record.add_argument("--out", type=Path, required=True, help="tub directory to create or extend")
    record.add_argument("--track", type=_track, default=DEFAULT_TRACK)
    record.add_argument("--laps", type=_positive(int), default=3)
    record.add_argument("--noise", type=_non_negative, default=0.0, help="steering noise std (executed, not recorded)")
    record.add_argument("--recovery", type=_non_negative, default=0.0, metavar="SECONDS",
                        help="mean interval between recovery manoeuvres (0 = none)")
    record.add_argument("--speed", type=_positive(float), help="expert cruise speed, m/s (default 1.5)")
    record.add_argument("--seed", type=int, default=0)
    record.add_argument("--randomize", type=_non_negative, default=0.0, metavar="X")

    drive = commands.add_parser("drive", help="drive a running simulator with the expert, over the protocol")
    drive.add_argument("--sim", type=_host_port, default=("127.0.0.1", DEFAULT_PORT), metavar="HOST:PORT")
    drive.add_argument("--track", type=_track, default=DEFAULT_TRACK)
    drive.add_argument("--laps", type=_positive(int), default=1)
    drive.add_argument("--duration", type=_positive(float), help="stop after this many seconds")
    drive.add_argument("--record", type=Path, help="record a tub here while driving")
    drive.add_argument("--noise", type=_non_negative, default=0.0)
    drive.add_argument("--connect-timeout", type=_positive(float), default=15.0, metavar="SECONDS",
                       help="keep trying to reach a simulator that is still starting (default 15)")

    commands.add_parser("tracks", help="list the tracks")
    return parser


def _randomization(strength: float) -> Randomization:
    strength = min(1.0, strength)
    return Randomization(lighting=0.3 * strength, texture=strength, noise=6.0 * strength)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        verbose = [a for a in argv if a in ("-v", "--verbose")]
        argv = [*verbose, "serve", *[a for a in argv if a not in ("-v", "--verbose")]]
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return _serve(args)
    if args.command == "record":
        return _record(args)
    if args.command == "drive":
        return _drive(args)
    for scene in SCENES:
        track = get_track(scene.geometry)
        served = f" (served by {scene.geometry})" if scene.substituted else ""
        print(f"{scene.name:18s} {track.length:5.1f} m, road {track.width:.1f} m wide{served}: {track.description}")
    return 0


def _write_summary(path: Path, summary: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def _serve(args: argparse.Namespace) -> int:
    from simulator.server import ServerConfig, TwinServer

    config = ServerConfig(host=args.host, port=args.port, track=args.track, seed=args.seed, fps=args.fps,
                          randomization=_randomization(args.randomize), exit_on_quit=args.exit_on_quit,
                          time_scale=args.time_scale, greeting_delay=args.greeting_delay,
                          max_connections=args.max_connections, max_camera_pixels=args.max_camera)

    async def run() -> TwinServer:
        server = TwinServer(config)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, server.request_stop, signal.Signals(signum).name)
        try:
            await server.start()
        except OSError as exc:
            raise SystemExit(f"donkey-sim: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
        print(f"donkey-sim: listening on {config.host}:{config.port}", file=sys.stderr, flush=True)
        await server.serve(args.duration)
        return server

    server = asyncio.run(run())
    summary = server.summary()
    if args.summary:
        _write_summary(args.summary, summary)
    cars: list[dict[str, Any]] = summary["cars"]
    for car in cars:
        logging.getLogger("donkey-sim").info(
            "car %(car)s (%(peer)s) on %(track)s (%(geometry)s): %(laps)s laps, %(off_track_events)s off-track, "
            "max |cte| %(max_abs_cte)s m, %(telemetry_hz)s Hz",
            {"laps": 0, "off_track_events": 0, "max_abs_cte": 0, **car})
    return 0


def _record(args: argparse.Namespace) -> int:
    from simulator.record import progress_printer, record_in_process

    result = record_in_process(
        args.out, track=args.track, laps=args.laps, noise=args.noise, recovery_interval=args.recovery,
        speed=args.speed, seed=args.seed, randomization=_randomization(args.randomize),
        progress=progress_printer(),
    )
    rate = result.records / result.elapsed_s if result.elapsed_s else 0.0
    print(f"tub: {args.out.resolve()}")
    print(f"records: {result.records} ({result.laps} laps of {args.track}, "
          f"{result.stats['off_track_events']} off-track, {rate:.0f} records/s)")
    return 0 if result.laps >= args.laps else 1


def _drive(args: argparse.Namespace) -> int:
    from agent.hw.donkeysim.client import SimError
    from simulator.record import drive_over_protocol, progress_printer

    host, port = args.sim
    try:
        result = drive_over_protocol(host, port, track=args.track, laps=args.laps, duration=args.duration,
                                     out=args.record, noise=args.noise, progress=progress_printer(),
                                     connect_timeout=args.connect_timeout)
    except SimError as exc:
        print(f"donkey-sim drive: {exc}", file=sys.stderr)
        return 2
    print(f"laps: {result.laps} in {result.elapsed_s:.1f} s")
    if args.record:
        print(f"tub: {args.record.resolve()}")
        print(f"records: {result.records} (dropped {result.dropped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
