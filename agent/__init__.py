"""donkey-agent: the trusted, real-time edge agent for DonkeyCar robots."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("donkey-edge-agent")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
