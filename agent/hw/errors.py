"""The hardware errors, in a module of their own so every backend can import them without a cycle."""

from __future__ import annotations

from agent.errors import AgentError


class ActuatorError(AgentError, OSError):
    """The actuators did not take a command (I2C error, a simulator that refused a send...)."""


class HardwareUnavailableError(AgentError, RuntimeError):
    """A configured device or its library is missing; the message says which and how to fix it."""
