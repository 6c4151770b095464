"""`donkey-agent safe-stop` and `donkey-agent doctor`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from agent.config import validate
from agent.service.safestop import safe_stop
from tests.fakes.i2c import FakePca9685Bus
from tests.test_cli import start_twin

ROOT = Path(__file__).parent.parent
PCA = validate({"actuators": {"backend": "pca9685", "pca9685": {"steering_channel": 1, "throttle_channel": 0}}}, "t")


def test_safe_stop_writes_neutral_and_is_idempotent() -> None:
    bus = FakePca9685Bus()
    bus.registers[0x06:0x0A] = bytes([0, 0, 0xF4, 0x01])  # throttle channel left at full forward (500)
    for _ in range(2):
        code, text = safe_stop(PCA, i2c=bus)
        assert code == 0 and "at neutral" in text
        assert bus.channel(0) == (0, 370) and bus.channel(1) == (0, 375)


def test_safe_stop_retries_a_flaky_bus_and_reports_a_dead_one() -> None:
    bus = FakePca9685Bus()
    code, _ = safe_stop(PCA, i2c=bus)
    bus.fail_led_writes = 2  # two failed writes, then the bus answers again
    code, text = safe_stop(PCA, i2c=bus)
    assert code == 0 and bus.channel(0) == (0, 370)
    bus.fail_led_writes = 10_000
    code, text = safe_stop(PCA, i2c=bus)
    assert code == 1 and "could not write neutral" in text


def test_safe_stop_without_the_board_exits_69() -> None:
    code, text = safe_stop(PCA, i2c=FakePca9685Bus(address=0x41))
    assert code == 69 and "no PCA9685 at 0x40" in text


def doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


def test_doctor_passes_a_working_setup(tmp_path: Path) -> None:
    twin, port = start_twin("--track", "generated_track")
    config = tmp_path / "agent.toml"
    config.write_text(f"[twin]\nport = {port}\n[autopilot]\nmodel = \"{ROOT / 'models' / 'pilot.tflite'}\"\n")
    try:
        result = doctor(config)
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
    assert result.returncode == 0, result.stdout
    assert "PASS  config" in result.stdout and "PASS  simulator" in result.stdout
    assert "PASS  autopilot model     linear model loads" in result.stdout
    assert ": 0 failed" in result.stdout


def test_doctor_names_failures_and_fixes(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[actuators]\nbackend = 'pca9685'\n[actuators.pca9685]\ni2c_bus = 7\n[camera]\nbackend = 'v4l2'\n"
                      "device = '/dev/video9'\n[twin]\nport = 9\n[autopilot]\nmodel = 'missing.tflite'\n")
    result = doctor(config)
    assert result.returncode == 1
    out = result.stdout
    assert "FAIL  I2C bus (PCA9685)" in out and "/dev/i2c-7 does not exist" in out
    assert "FAIL  camera (V4L2)" in out and "FAIL  autopilot model" in out and "no such model file" in out
    assert "fix: " in out
    config.write_text("[drive]\nmode = 'turbo'\n")
    result = doctor(config)
    assert result.returncode == 1 and "FAIL  config" in result.stdout and "drive.mode" in result.stdout


def test_doctor_warns_that_the_car_will_start_held(tmp_path: Path) -> None:
    import json
    import os

    state = Path(os.environ["XDG_STATE_HOME"]) / "donkey-agent" / "default-car"
    state.mkdir(parents=True)
    (state / "safety.json").write_text(json.dumps({"version": 1, "latched": {"estop": {"detail": "e-stop from mqtt"}},
                                                   "run": {"running": False}}))
    config = tmp_path / "agent.toml"
    config.write_text("[drive]\nmode = 'user'\n")
    out = doctor(config).stdout
    assert "WARN  safety state" in out and "the agent will start held: estop" in out
    assert "donkey-agent faults clear" in out


def test_doctor_with_attestation_shows_this_machine_and_the_fleets_token(tmp_path: Path) -> None:
    """No TPM here: the TPM row fails with its fix; the fleet's retained token for this car is checked as the
    agent would check it (pass, then revoked)."""
    from tests import mosquitto
    from tests.test_attest_car import UUID, fleet_key, token

    key, public = fleet_key(tmp_path)
    broker = mosquitto.Broker(tmp_path).start()
    config = tmp_path / "agent.toml"
    config.write_text(f"""[drive]\nmode = "user"\n[telemetry]\nurl = "mqtt://127.0.0.1:{broker.port}"
car_id = "car1"\nfleet = "lab"\n[attestation]\nrequire = true\ntrusted_keys = ["{public}"]\nagent_uuid = "{UUID}"
[twin]\nport = 9\n""")
    topic = "donkey/lab/car1/attestation"
    try:
        out = doctor(config).stdout
        assert "FAIL  attestation: fleet token" in out and "no token on donkey/lab/car1/attestation" in out
        tpm = next(line for line in out.splitlines() if "attestation: tpm_resource_manager" in line)
        assert tpm.startswith("PASS" if Path("/dev/tpmrm0").exists() else "FAIL")
        assert "attestation: keylime_agent_unit" in out and "attestation: securityfs" in out
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-r", "-t", topic, "-m",
                        token(key, "pass").decode()], check=True)
        out = doctor(config).stdout
        assert "PASS  attestation: fleet token" in out and "expires in" in out
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-r", "-t", topic, "-m",
                        token(key, "revoked").decode()], check=True)
        out = doctor(config).stdout
        assert "FAIL  attestation: fleet token" in out and "revoked" in out
    finally:
        broker.stop()


def test_doctor_checks_the_stores_signed_model_not_a_file_name(tmp_path: Path) -> None:
    from agent.bundle.signing import sign_with_key
    from agent.bundle.store import ModelStore
    from tests.bundles import make_bundle, make_key

    private, _ = make_key(tmp_path, "fleet")
    bundle = make_bundle(tmp_path / "bundle", version="7.1.0")
    sign_with_key(bundle, private)
    store = ModelStore(tmp_path / "store")
    store.install(bundle)
    store.promote()
    config = tmp_path / "agent.toml"
    config.write_text(f'[models]\nstore = "{tmp_path / "store"}"\n[twin]\nport = 9\n')
    out = doctor(config).stdout
    line = next(line for line in out.splitlines() if "autopilot model" in line)
    assert line.startswith("PASS") and "pilot 7.1.0 (signed bundle, active): linear model loads" in line
