"""The Donkey simulator protocol (JSON over TCP, port 9091), shared by our client and our twin.

See docs/twin.md for the protocol coverage table.
"""

DEFAULT_PORT = 9091
PROTOCOL_VERSION = "2"
