"""Build the camera and actuators that the config asks for; hardware libraries load only when chosen."""

from __future__ import annotations

from contextlib import ExitStack

from agent.config import AgentConfig
from agent.hw.errors import HardwareUnavailableError
from agent.hw.interfaces import Actuators, Camera

__all__ = ["HardwareUnavailableError", "build_hardware"]


def build_hardware(config: AgentConfig, stack: ExitStack) -> tuple[Camera, Actuators]:
    """Open the configured camera and actuators; ``stack`` closes them (actuators last, at neutral)."""
    link = None
    if "twin" in (config.camera.backend, config.actuators.backend):
        from agent.hw.twin import TwinLink

        twin = config.twin
        link = TwinLink(twin.host, twin.port, scene=twin.scene, width=config.camera.width,
                        height=config.camera.height, connect_timeout=twin.connect_timeout_s)
        stack.callback(link.close)

    actuators: Actuators
    if config.actuators.backend == "twin":
        from agent.hw.twin import TwinActuators

        assert link is not None
        actuators = TwinActuators(link)
    else:
        from agent.hw.pca9685 import Pca9685Actuators

        actuators = Pca9685Actuators.open(config.actuators.pca9685, config.actuators.calibration)
    stack.callback(actuators.close)

    camera: Camera
    backend = config.camera.backend
    if backend == "twin":
        from agent.hw.twin import TwinCamera

        assert link is not None
        camera = TwinCamera(link)
    elif backend == "tub":
        from agent.hw.cameras import TubReplayCamera

        assert config.camera.tub is not None
        camera = TubReplayCamera(config.camera.tub, fps=config.camera.fps)
    elif backend == "picamera2":
        from agent.hw.cameras import Picamera2Camera

        camera = Picamera2Camera(config.camera.width, config.camera.height, config.camera.fps)
    else:
        from agent.hw.cameras import V4l2Camera

        camera = V4l2Camera(config.camera.device, config.camera.width, config.camera.height, config.camera.fps)
    stack.callback(camera.close)
    return camera, actuators
