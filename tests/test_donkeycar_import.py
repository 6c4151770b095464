"""Importing a calibrated car's DonkeyCar myconfig.py."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.config import validate
from agent.hw.donkeycar_import import DonkeyConfigError, import_myconfig, to_toml

MYCONFIG_5 = '''
import os
CAR_PATH = os.path.dirname(os.path.realpath(__file__))   # computed: ignored
DRIVE_TRAIN_TYPE = "PWM_STEERING_THROTTLE"
PWM_STEERING_THROTTLE = {
    "PWM_STEERING_PIN": "PCA9685.1:41.3",
    "PWM_STEERING_SCALE": 1.0,
    "PWM_STEERING_INVERTED": False,
    "PWM_THROTTLE_PIN": "PCA9685.1:41.2",
    "PWM_THROTTLE_SCALE": 1.0,
    "PWM_THROTTLE_INVERTED": True,
    "STEERING_LEFT_PWM": 470,
    "STEERING_RIGHT_PWM": 275,
    "THROTTLE_FORWARD_PWM": 510,
    "THROTTLE_STOPPED_PWM": 375,
    "THROTTLE_REVERSE_PWM": 215,
}
open("/tmp/should-not-exist-donkey-import", "w")  # never executed
'''


def test_donkeycar_5_config(tmp_path: Path) -> None:
    path = tmp_path / "myconfig.py"
    path.write_text(MYCONFIG_5)
    actuators = import_myconfig(path)
    assert not Path("/tmp/should-not-exist-donkey-import").exists()
    assert actuators.pca9685.address == 0x41 and actuators.pca9685.steering_channel == 3
    assert actuators.pca9685.throttle_channel == 2
    cal = actuators.calibration
    assert (cal.steering_left_pwm, cal.steering_right_pwm) == (470, 275)
    assert (cal.throttle_forward_pwm, cal.throttle_stopped_pwm, cal.throttle_reverse_pwm) == (510, 375, 215)
    assert cal.throttle_inverted is True
    # The printed section is valid TOML that our config accepts unchanged.
    config = validate(tomllib.loads(to_toml(actuators)), "imported")
    assert config.actuators == actuators


def test_donkeycar_4_top_level_keys(tmp_path: Path) -> None:
    path = tmp_path / "myconfig.py"
    path.write_text("STEERING_CHANNEL = 1\nSTEERING_LEFT_PWM = 420\nSTEERING_RIGHT_PWM = 360\n"
                    "THROTTLE_CHANNEL = 0\nTHROTTLE_STOPPED_PWM = 380\nPCA9685_I2C_BUSNUM = 0\n")
    actuators = import_myconfig(path)
    assert actuators.pca9685.i2c_bus == 0 and actuators.calibration.steering_left_pwm == 420
    assert actuators.calibration.throttle_stopped_pwm == 380


@pytest.mark.parametrize(("text", "message"), [
    ("PWM_STEERING_THROTTLE = {'PWM_STEERING_PIN': 'RPI_GPIO.BOARD.33', 'PWM_THROTTLE_PIN': 'PCA9685.1:40.0'}",
     "not a PCA9685 pin"),
    ("DRIVE_TRAIN_TYPE = 'SERVO_HBRIDGE_2PIN'", "not supported"),
    ("STEERING_LEFT_PWM = 9000", "out of range"),
    ("def broken(:\n", "not valid Python"),
])
def test_unusable_configs_are_explained(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "myconfig.py"
    path.write_text(text)
    with pytest.raises(DonkeyConfigError, match=message):
        import_myconfig(path)


def test_cli_prints_the_section(tmp_path: Path) -> None:
    path = tmp_path / "myconfig.py"
    path.write_text(MYCONFIG_5)
    result = subprocess.run([sys.executable, "-m", "agent.cli", "import-calibration", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "address = 0x41" in result.stdout and "steering_left_pwm = 470" in result.stdout
