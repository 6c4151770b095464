"""``donkey-agent doctor``: what a field technician needs to know about a car, with fixes.

Each check returns PASS, WARN or FAIL with a detail and, when not passing, the fix.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig, ConfigError, load

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    result: str
    detail: str
    fix: str = ""


def _device(path: str, what: str, group: str) -> Check:
    if not Path(path).exists():
        return Check(what, FAIL, f"{path} does not exist", "enable it (raspi-config / config.txt) and reboot")
    if not os.access(path, os.R_OK | os.W_OK):
        return Check(what, FAIL, f"{path} exists but this user cannot use it",
                     f"add the agent's user to the {group} group (usermod -aG {group} donkey)")
    return Check(what, PASS, f"{path} is usable")


def _realtime(config: AgentConfig) -> list[Check]:
    checks = []
    wanted = config.drive.realtime.priority
    soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
    if wanted == 0:
        checks.append(Check("real-time priority", PASS, "not requested (drive.realtime.priority = 0)"))
    elif os.geteuid() == 0:
        checks.append(Check("real-time priority", PASS, f"SCHED_FIFO {wanted} allowed (running as root)"))
    elif soft == resource.RLIM_INFINITY or soft >= wanted:
        checks.append(Check("real-time priority", PASS, f"SCHED_FIFO {wanted} allowed (RLIMIT_RTPRIO {soft})"))
    else:
        checks.append(Check("real-time priority", WARN, f"RLIMIT_RTPRIO is {soft}, below {wanted}: the agent drives "
                            "without real-time scheduling", "run under the shipped unit (LimitRTPRIO=60)"))
    if config.drive.realtime.lock_memory:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if os.geteuid() == 0 or soft == resource.RLIM_INFINITY:
            checks.append(Check("memory locking", PASS, "mlockall allowed"))
        else:
            checks.append(Check("memory locking", WARN, f"RLIMIT_MEMLOCK is {soft} bytes: mlockall will be refused",
                                "run under the shipped unit (LimitMEMLOCK=infinity)"))
    return checks


def _simulator(config: AgentConfig) -> Check:
    address = f"{config.twin.host}:{config.twin.port}"
    try:
        with socket.create_connection((config.twin.host, config.twin.port), timeout=2.0):
            return Check("simulator", PASS, f"{address} accepts connections")
    except OSError as exc:
        return Check("simulator", FAIL, f"{address}: {exc.strerror or exc}",
                     "start it: donkey-sim --track generated_track")


def _store_model(config: AgentConfig) -> tuple[Path | None, str]:
    """The store's active bundle (or a first staged one), as the agent will start with it: (model path, what)."""
    from agent.bundle.errors import StoreError
    from agent.bundle.stage import installed, store_root
    from agent.bundle.store import ModelStore

    try:
        store = ModelStore(store_root(config))
        slot = store.slot("active") or store.slot("staged")
        if slot is None:
            return None, ""
        model = installed(slot)
    except (StoreError, OSError, ValueError) as exc:
        return None, f"the model store is unreadable: {exc}"
    return model.model_path, f"{model.name} {model.version} (signed bundle, {slot.name})"


def _model(config: AgentConfig) -> Check:
    path, what = _store_model(config)
    if path is None and what:
        return Check("autopilot model", FAIL, what, "donkey-agent model list; reinstall the bundle")
    path = path or config.autopilot.model
    if path is None:
        if config.drive.mode == "user":
            return Check("autopilot model", PASS, "none configured (user mode)")
        return Check("autopilot model", FAIL, f"mode {config.drive.mode!r} needs autopilot.model",
                     "set autopilot.model in the config")
    from agent.pilot.check import check_model
    from agent.pilot.model import ModelError

    try:
        started = time.perf_counter()
        report = check_model(path, kind=config.autopilot.kind, num_threads=config.autopilot.num_threads)
        load_s = time.perf_counter() - started
    except (ModelError, ValueError) as exc:
        return Check("autopilot model", FAIL, str(exc), "use a linear/categorical/... model; see model check")
    invoke = report["invoke_ms"]
    budget = config.drive.inference_budget_ms
    result = PASS if invoke["p99"] < budget else WARN
    return Check("autopilot model", result,
                 f"{what + ': ' if what else ''}{report['kind']} model loads in {load_s:.1f} s; invoke p50 "
                 f"{invoke['p50']:.1f} ms, "
                 f"p99 {invoke['p99']:.1f} ms (budget {budget:.0f} ms)",
                 "" if result == PASS else "a smaller model, or more autopilot.num_threads")


def run_checks(config_path: Path | None) -> list[Check]:
    checks: list[Check] = []
    try:
        config = load(config_path)
        checks.append(Check("config", PASS, f"{config_path or 'defaults'} is valid"))
    except ConfigError as exc:
        return [Check("config", FAIL, str(exc), "fix the named keys; docs/operating.md lists them all")]
    if "twin" in (config.camera.backend, config.actuators.backend):
        checks.append(_simulator(config))
    if config.actuators.backend == "pca9685":
        checks.append(_device(f"/dev/i2c-{config.actuators.pca9685.i2c_bus}", "I2C bus (PCA9685)", "i2c"))
    if config.gpio.estop_pin or config.gpio.status_led_pin:
        checks.append(_device("/dev/gpiochip0", "GPIO chip", "gpio"))
    if config.camera.backend == "v4l2":
        checks.append(_device(config.camera.device, "camera (V4L2)", "video"))
    elif config.camera.backend == "picamera2":
        media = sorted(Path("/dev").glob("media*"))
        checks.append(_device(str(media[0]), "camera (libcamera)", "video") if media
                      else Check("camera (libcamera)", FAIL, "no /dev/media* device", "connect the camera ribbon; "
                                 "camera_auto_detect=1 in config.txt"))
    checks += _realtime(config)
    checks.append(_model(config))
    checks.append(_safety_state(config))
    if config.attestation.require:
        checks += _attestation(config)
    return checks


ATTEST_FIXES = {
    "keylime_agent_config": "set a fixed uuid in /etc/keylime/agent.conf ([agent] uuid = \"...\"), or "
                            "[attestation] agent_uuid",
    "tpm_resource_manager": "enable the TPM (dtoverlay=tpm-slb9670 on a Pi) and the tpm_tis_spi module; reboot",
    "securityfs": "mount -t securityfs securityfs /sys/kernel/security (or fix the kernel command line)",
    "ima_measurements": "boot with IMA on (ima_policy from the shipped template; ima_template=ima-ng); run doctor "
                        "as root to read the list",
    "ima_policy": "install the shipped IMA policy (ansible/templates/ima-policy.j2) and reboot",
    "keylime_agent_unit": "systemctl enable --now keylime_agent",
}


def _attestation(config: AgentConfig) -> list[Check]:
    """The self-checks of agent/attest, and whether the fleet's bridge vouches for this car right now."""
    import agent
    from agent.attest.selfcheck import run_all

    targets = [Path(agent.__file__).resolve().parent, *config.attestation.model_dirs,
               *([config.autopilot.model] if config.autopilot.model else [])]
    checks = []
    for row in run_all(targets, unit=config.attestation.keylime_unit):
        result = PASS if row.ok else (FAIL if row.ok is False else WARN)
        fix = ATTEST_FIXES.get(row.name.split(":", 1)[0].replace("ima_policy_covers", "ima_policy"), "")
        checks.append(Check(f"attestation: {row.name}", result, row.detail, fix))
    checks.append(_fleet_token(config))
    return checks


def _fleet_token(config: AgentConfig, wait_s: float = 3.0) -> Check:
    """The retained token on this car's attestation topic, checked as the running agent would check it."""
    name = "attestation: fleet token"
    if config.telemetry.url is None:
        return Check(name, FAIL, "attestation.require is set but telemetry.url is not", "set telemetry.url")
    from agent.attest.client import AttestationClient
    from agent.attest.errors import AttestationSetupError
    from agent.core.handoff import Clearance
    from agent.telemetry.retained import read_retained
    from agent.telemetry.topics import Topics

    try:
        client = AttestationClient(config.attestation, fleet=config.telemetry.fleet, car=config.telemetry.car_id,
                                   clearance=Clearance())
    except AttestationSetupError as exc:
        return Check(name, FAIL, str(exc), "fix the named key")
    topic = Topics(config.telemetry.fleet, config.telemetry.car_id).attestation
    payload, problem = read_retained(config.telemetry, topic, wait_s)
    if problem:
        return Check(name, WARN, f"{topic}: {problem}", "check telemetry.url and the broker; is the fleet's "
                     "donkey-attest-bridge running?")
    if payload is None:
        return Check(name, FAIL, f"no token on {topic}: the car will not drive autonomously",
                     "is the fleet's donkey-attest-bridge running, and is this car's UUID enrolled with the verifier?")
    client.on_token(payload)
    status = client.status()
    if status["may_drive"]:
        left = (status["expires_ms"] - time.time() * 1000) / 1000
        return Check(name, PASS, f"{status['reason']}; expires in {left:.0f} s")
    return Check(name, FAIL, status["reason"], "see the fleet's Keylime verifier for this car's UUID "
                 f"({client.uuid})")


def _safety_state(config: AgentConfig) -> Check:
    """Latched faults kept across restarts: the car will start held until they are cleared."""
    from agent.service.control import _agent_pid, find_state
    from agent.service.state import restored_faults

    state = find_state(config)
    saved = state.load()
    running = _agent_pid(state)
    if running is not None and not saved.problem:
        # A running agent's own record says "running, driving": that is its live state, not a crash.
        latched = sorted(saved.latched)
        return Check("safety state", WARN if latched else PASS,
                     f"the agent is running (pid {running})" + (f"; latched: {', '.join(latched)}" if latched else ""),
                     "clear_fault over MQTT once the cause is fixed" if latched else "")
    if saved.problem:
        return Check("safety state", FAIL, f"{saved.problem}: the agent will start held",
                     f"inspect it, then `donkey-agent faults clear` (or remove {state.path})")
    held = restored_faults(saved, after_crash=config.drive.after_crash)
    if held:
        names = ", ".join(sorted(fault.value for fault in held))
        return Check("safety state", WARN, f"the agent will start held: {names} ({state.path})",
                     "find out why, then clear_fault over MQTT, or `donkey-agent faults clear` while stopped")
    return Check("safety state", PASS, f"nothing latched ({state.path})")


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.result}  {check.name:<{width}}  {check.detail}")
        if check.fix and check.result != PASS:
            lines.append(f"{'':4}  {'':<{width}}  fix: {check.fix}")
    failed = sum(c.result == FAIL for c in checks)
    warned = sum(c.result == WARN for c in checks)
    lines.append(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return "\n".join(lines)
