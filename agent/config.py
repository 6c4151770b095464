"""The agent's one config file (TOML), validated with pydantic.

Keys are grouped by concern ([drive], [camera], [twin], [actuators], [autopilot], [gpio],
[recording]; later [telemetry], [attestation], [models]). Unknown keys are errors, so a
typo never silently falls back to a default. Every error names the file, the key and the
problem, e.g. ``/etc/donkey-agent/agent.toml: drive.max_throttle: Input should be less than
or equal to 1``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import AgentError

DEFAULT_PATH = Path("/etc/donkey-agent/agent.toml")


def config_path(explicit: Path | None) -> Path | None:
    """The config file a command reads: the one named (``--config``), else the car's if it exists, else none."""
    return explicit if explicit else (DEFAULT_PATH if DEFAULT_PATH.exists() else None)

Mode = Literal["user", "local_angle", "local"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Pulse = Annotated[int, Field(ge=0, le=4095)]


class ConfigError(AgentError, ValueError):
    """An invalid config: the message names the file, the key and the problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RealtimeConfig(Section):
    priority: Annotated[int, Field(ge=0, le=99)] = 50  # SCHED_FIFO priority; 0 = leave the scheduler alone
    cpus: list[Annotated[int, Field(ge=0)]] = []  # CPU affinity of the drive thread; empty = unchanged
    lock_memory: bool = True  # mlockall(MCL_CURRENT | MCL_FUTURE)
    freeze_gc: bool = True  # gc.freeze() after warm-up; collections only outside the hot path
    switch_interval_ms: Annotated[float, Field(gt=0, le=5)] = 0.05  # sys.setswitchinterval; see docs/performance.md


class DriveConfig(Section):
    rate_hz: Annotated[float, Field(gt=0, le=200)] = 20.0
    # "locked": phase-locked to the camera's clock, the output at an adaptive offset from the predicted frame;
    # "camera": a cycle per frame; "timer": absolute deadlines at rate_hz (docs/performance.md compares them).
    pacing: Literal["locked", "camera", "timer"] = "locked"
    mode: Mode = "local"  # mode at start-up
    max_throttle: Fraction = 0.5
    throttle_multiplier: Annotated[float, Field(ge=0, le=5)] = 1.0  # DonkeyCar's AI_THROTTLE_MULT
    throttle_ramp_per_s: Annotated[float, Field(gt=0)] = 2.0  # largest increase of |throttle| per second
    # Actuate at a fixed delay after the tick (timer) or the frame's capture (camera) instead of
    # as soon as computed: output timing no longer jitters with inference time (logical execution
    # time). Costs that constant latency; 0 actuates at once. Must be below one period.
    output_delay_ms: Annotated[float, Field(ge=0)] = 10.0
    # Locked pacing: the output leaves at the predicted frame time plus the frames' p99 lateness, the cycle's
    # p99.9 compute time and this margin, never more than output_delay_max_ms (nor 80 % of a period).
    output_margin_ms: Annotated[float, Field(ge=0)] = 0.5
    output_delay_max_ms: Annotated[float, Field(gt=0)] = 20.0
    max_frame_age_ms: Annotated[float, Field(gt=0)] = 150.0
    inference_budget_ms: Annotated[float, Field(gt=0)] = 40.0  # an invoke slower than this is an overrun
    overrun_limit: Annotated[int, Field(ge=1)] = 3  # consecutive inference overruns before neutral
    heartbeat_timeout_ms: Annotated[float, Field(gt=0)] = 500.0  # manual control in `user` mode
    fault_clear_hold_ms: Annotated[float, Field(ge=0)] = 300.0  # a transient fault must be gone this long
    estop_hold_ms: Annotated[float, Field(ge=0, le=60_000)] = 1000.0  # a clear must arrive this long after an e-stop
    # The dead-man monitor writes neutral and latches drive_stall when the drive thread misses its
    # cycles for this many periods past its own deadline.
    deadman_periods: Annotated[float, Field(ge=1, le=100)] = 3.0
    # The car counts as stopped (a model may be swapped) while a fault holds it in neutral, or once the
    # throttle written has been neutral for this long.
    stopped_after_ms: Annotated[float, Field(ge=0, le=60_000)] = 1000.0
    # After an unclean exit while driving (crash, kill, watchdog, power cut): "hold" starts with the
    # unclean_exit fault latched (neutral until a clear_fault); "resume" drives again.
    after_crash: Literal["hold", "resume"] = "hold"
    realtime: RealtimeConfig = RealtimeConfig()

    @model_validator(mode="after")
    def _delay_within_a_period(self) -> DriveConfig:
        if self.output_delay_ms >= 1000.0 / self.rate_hz:
            raise ValueError(f"output_delay_ms ({self.output_delay_ms}) must be below one period "
                             f"({1000.0 / self.rate_hz:.1f} ms at rate_hz {self.rate_hz})")
        return self


class CameraConfig(Section):
    backend: Literal["twin", "picamera2", "v4l2", "tub"] = "twin"
    width: Annotated[int, Field(ge=8, le=4096)] = 160
    height: Annotated[int, Field(ge=8, le=4096)] = 120
    fps: Annotated[float, Field(gt=0, le=240)] = 20.0
    device: str = "/dev/video0"  # v4l2
    tub: Path | None = None  # replay source for backend = "tub"

    @model_validator(mode="after")
    def _tub_needs_a_path(self) -> CameraConfig:
        if self.backend == "tub" and self.tub is None:
            raise ValueError("backend 'tub' needs camera.tub = the tub directory to replay")
        return self


class TwinConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 9091
    scene: str = "generated_track"
    connect_timeout_s: Annotated[float, Field(gt=0)] = 15.0


class CalibrationConfig(Section):
    """DonkeyCar's PWM_STEERING_THROTTLE values: 12-bit PCA9685 counts at 60 Hz."""

    steering_left_pwm: Pulse = 460
    steering_right_pwm: Pulse = 290
    steering_inverted: bool = False
    steering_scale: Annotated[float, Field(gt=0, le=10)] = 1.0
    throttle_forward_pwm: Pulse = 500
    throttle_stopped_pwm: Pulse = 370
    throttle_reverse_pwm: Pulse = 220
    throttle_inverted: bool = False
    throttle_scale: Annotated[float, Field(gt=0, le=10)] = 1.0


class Pca9685Config(Section):
    i2c_bus: Annotated[int, Field(ge=0)] = 1
    address: Annotated[int, Field(ge=0x03, le=0x77)] = 0x40
    frequency_hz: Annotated[float, Field(ge=24, le=1526)] = 60.0
    steering_channel: Annotated[int, Field(ge=0, le=15)] = 1
    throttle_channel: Annotated[int, Field(ge=0, le=15)] = 0

    @model_validator(mode="after")
    def _distinct_channels(self) -> Pca9685Config:
        if self.steering_channel == self.throttle_channel:
            raise ValueError(f"steering_channel and throttle_channel are both {self.steering_channel}: "
                             "the servo and the ESC need a channel each")
        return self


class ActuatorsConfig(Section):
    backend: Literal["twin", "pca9685"] = "twin"
    pca9685: Pca9685Config = Pca9685Config()
    calibration: CalibrationConfig = CalibrationConfig()


class AutopilotConfig(Section):
    model: Path | None = None  # None: no autopilot (user mode only)
    kind: Literal["auto", "linear", "categorical", "inferred", "behavior", "localizer", "imu", "memory"] = "auto"
    num_threads: Annotated[int, Field(ge=1, le=16)] = 2


class GpioConfig(Section):
    pin_factory: str | None = None  # gpiozero factory name; None = gpiozero's default order
    estop_pin: str | None = None  # e.g. "GPIO17" (button to ground); None = no button
    status_led_pin: str | None = None


class RecordingConfig(Section):
    path: Path | None = None  # tub directory; None = do not record
    queue: Annotated[int, Field(ge=1)] = 256


class TelemetryConfig(Section):
    url: str | None = None  # mqtt://host:port or mqtts://host:port; None = no fleet link
    car_id: str = "car"
    fleet: str = "default"
    protocol: Literal["5", "3.1.1"] = "5"  # 3.1.1 for Grafana's MQTT data source
    rate_hz: Annotated[float, Field(gt=0, le=50)] = 5.0
    keepalive_s: Annotated[int, Field(ge=1, le=3600)] = 30
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    outbox: Path | None = None  # default: outbox.db in the state directory ([state] directory)
    outbox_max_events: Annotated[int, Field(ge=10)] = 10_000
    homeassistant: bool = False  # publish Home Assistant MQTT discovery configs
    prometheus: str | None = None  # e.g. "127.0.0.1:9108": a local /metrics endpoint (needs no broker)
    homeassistant_prefix: str = "homeassistant"
    command_rate_per_s: Annotated[float, Field(gt=0, le=1000)] = 10.0  # commands accepted per second (burst 20)
    command_result_expiry_s: Annotated[int, Field(ge=1)] = 3600  # MQTT 5 message expiry of the retained .../res

    @model_validator(mode="after")
    def _url_scheme(self) -> TelemetryConfig:
        if self.url is not None and not self.url.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"url {self.url!r} must start with mqtt:// or mqtts://")
        return self


class RolloutConfig(Section):
    """How a staged model earns its place (agent/rollout): a shadow trial, then probation once active."""

    shadow: bool = True  # trial the candidate beside the active model on live frames before it may drive
    shadow_min_frames: Annotated[int, Field(ge=1)] = 200  # frames it must have answered (10 s at 20 Hz)
    shadow_timeout_s: Annotated[float, Field(gt=0)] = 300.0  # no verdict by then (the car never drove): rejected
    max_steering_error_mean: Annotated[float, Field(ge=0, le=2)] = 0.10  # |candidate - active|, on [-1, 1]
    max_steering_error_max: Annotated[float, Field(ge=0, le=2)] = 0.60
    max_throttle_error_mean: Annotated[float, Field(ge=0, le=2)] = 0.10
    max_throttle_error_max: Annotated[float, Field(ge=0, le=2)] = 0.60
    probation_s: Annotated[float, Field(ge=0)] = 120.0  # after activation: model faults in this window roll back
    probation_max_inference_errors: Annotated[int, Field(ge=0)] = 0
    probation_max_inference_overruns: Annotated[int, Field(ge=0)] = 0
    probation_max_drive_stalls: Annotated[int, Field(ge=0)] = 0


class ModelsConfig(Section):
    """Signed model bundles (docs/models.md): where they are trusted from, kept, dropped, and the limits."""

    trust_dir: Path = Path("/etc/donkey-agent/trusted-keys")  # PEM public keys / CA certificates (+ NAME.toml)
    store: Path | None = None  # the A/B slots; default: models/ in the state directory
    inbox: Path | None = None  # where bundle tars are dropped; default: inbox/ in the state directory
    require_signed: bool = True  # false: unsigned bundles are accepted, loudly (development only)
    max_bundle_mb: Annotated[float, Field(gt=0, le=4096)] = 256.0
    keep_free_mb: Annotated[float, Field(ge=0)] = 64.0  # downloads never leave less free on the disk
    connect_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    read_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0  # longest silence inside a download
    download_deadline_s: Annotated[float, Field(gt=0)] = 1800.0  # a whole download, every retry included
    download_attempts: Annotated[int, Field(ge=1, le=100)] = 5  # attempts in a row without progress
    smoke_budget_ms: Annotated[float, Field(gt=0)] = 40.0  # largest invoke p99 in the smoke test
    smoke_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0  # the smoke test process is killed after this
    smoke_frames: Path | None = None  # recorded frames (.npy, uint8 N x H x W x 3) for the smoke test
    rollout: RolloutConfig = RolloutConfig()


class StateConfig(Section):
    # Latched faults, the run marker and the fleet outbox live here. Default: $STATE_DIRECTORY
    # (systemd's StateDirectory=), else $XDG_STATE_HOME (~/.local/state)/donkey-agent/<fleet>-<car_id>.
    directory: Path | None = None


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"  # SIGHUP applies a change at once


class AttestationConfig(Section):
    """Keylime/IMA attestation (docs/attestation.md): the car drives autonomously only with a valid fleet token."""

    require: bool = False  # true: local/local_angle only with a valid, unexpired "pass" token for this car
    trusted_keys: list[Path] = []  # the fleet's token-signing public keys (PEM, ECDSA P-256 or Ed25519)
    # This car's Keylime agent UUID; None: read it from the Keylime agent's own settings (agent.conf, conf.d, env).
    agent_uuid: str | None = None
    max_clock_skew_s: Annotated[float, Field(ge=0, le=600)] = 30.0  # a token issued this far ahead is still valid
    manual_without_token: bool = True  # manual driving (user mode) stays possible without a token
    model_dirs: list[Path] = []  # measured model directories (active and staged): in `attest policy` and doctor
    keylime_unit: str = "keylime_agent"  # the Keylime agent's systemd unit, checked by doctor

    @model_validator(mode="after")
    def _required_needs_keys(self) -> AttestationConfig:
        if self.require and not self.trusted_keys:
            raise ValueError("require = true needs trusted_keys: the fleet's public key files (PEM)")
        if self.agent_uuid is not None:
            import uuid

            try:
                uuid.UUID(self.agent_uuid)
            except ValueError:
                raise ValueError(f"agent_uuid {self.agent_uuid!r} is not a UUID") from None
        return self


class AgentConfig(Section):
    drive: DriveConfig = DriveConfig()
    camera: CameraConfig = CameraConfig()
    twin: TwinConfig = TwinConfig()
    actuators: ActuatorsConfig = ActuatorsConfig()
    autopilot: AutopilotConfig = AutopilotConfig()
    gpio: GpioConfig = GpioConfig()
    recording: RecordingConfig = RecordingConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    models: ModelsConfig = ModelsConfig()
    state: StateConfig = StateConfig()
    logging: LoggingConfig = LoggingConfig()
    attestation: AttestationConfig = AttestationConfig()
    source: str = Field(default="<defaults>", exclude=True)

    def with_overrides(self, overrides: dict[str, Any]) -> AgentConfig:
        """A new config with dotted-key overrides (``{"drive.mode": "user"}``), validated again."""
        data = self.model_dump(mode="python", exclude={"source"})
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return validate(data, f"{self.source} (with command-line overrides)")


def _format(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see docs/operating.md for the keys)"
        problems.append(f"{source}: {key}: {message}")
    return "\n".join(problems)


def validate(data: dict[str, Any], source: str) -> AgentConfig:
    try:
        return AgentConfig.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None


def load(path: Path | None) -> AgentConfig:
    """Load and validate a config file; ``None`` gives the defaults."""
    if path is None:
        return AgentConfig()
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (TOML must be UTF-8): byte 0x{exc.object[exc.start]:02x} at "
                          f"offset {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "source" in data:
        raise ConfigError(f"{path}: source: unknown key")
    return validate(data, str(path))
