"""A telemetry message from the simulator, checked: numeric fields parsed, camera frames decoded.

The simulator is not trusted. Every field the agent uses is type-checked here, and a message
that fails a check raises ``BadMessageError`` with a short ``reason`` (the key the client counts
drops by) rather than reaching the drive loop. An image is refused from its header unless it
has the configured size, so a decompression bomb is never decoded, and ``max_image_b64`` bounds
what a message may weigh for the configured camera, so the client's framing can cap objects at
what that camera can produce.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from agent.errors import AgentError
from agent.hw.donkeysim.framing import ProtocolError, get_float

MESSAGE_HEADROOM = 64 * 1024  # bytes for the fields around the image(s)
IMAGE_FORMATS = ("JPEG", "PNG", "TGA")  # what cam_config's img_enc can ask for
IMU_FIELDS = ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z")
NUMBER_FIELDS = (
    "steering_angle", "throttle", "speed", "time", "cte", "activeNode", "totalNodes",
    "pos_x", "pos_y", "pos_z", "vel_x", "vel_y", "vel_z", "pitch", "yaw", "roll", *IMU_FIELDS,
)


class BadMessageError(AgentError):
    """Why one message from the simulator was dropped: ``reason`` is the counter's key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Telemetry:
    """One good telemetry message: every field the agent uses has been checked and parsed."""

    seq: int  # increases by one per telemetry message published
    received: float  # time.monotonic() when the bytes that completed the message were received (before decoding)
    image: NDArray[np.uint8]  # (H, W, 3) RGB, the configured camera size
    fields: dict[str, Any] = field(repr=False)  # the message as sent, without the images
    image_b: NDArray[np.uint8] | None = None
    numbers: Mapping[str, float] = field(default_factory=dict, repr=False)  # finite floats, parsed on arrival

    @property
    def imu(self) -> tuple[float, float, float, float, float, float]:
        """accel_x/y/z, gyro_x/y/z as floats (0.0 where the simulator does not send one)."""
        n = self.numbers
        return (n.get("accel_x", 0.0), n.get("accel_y", 0.0), n.get("accel_z", 0.0),
                n.get("gyro_x", 0.0), n.get("gyro_y", 0.0), n.get("gyro_z", 0.0))

    def number(self, key: str, default: float = 0.0) -> float:
        """A numeric field; never raises (fields outside NUMBER_FIELDS are parsed here, leniently)."""
        if key in self.numbers:
            return self.numbers[key]
        try:
            return get_float(self.fields, key, default)
        except ProtocolError:
            return default


def max_image_b64(width: int, height: int) -> int:
    """Base64 length of the largest frame a width x height camera can send.

    Worst case is an uncompressed image: TGA (raw plus a header) or PNG of noise (raw plus a
    filter byte per row and deflate's stored-block overhead); a quarter on top covers both and
    a JPEG of noise at high quality.
    """
    raw = width * height * 3
    encoded = raw + raw // 4 + 4096
    return 4 * math.ceil(encoded / 3)


def decode_image(data: object, size: tuple[int, int] | None = None) -> NDArray[np.uint8]:
    """Base64 JPEG/PNG/TGA to an (H, W, 3) uint8 RGB array; raises BadMessageError.

    With ``size`` (width, height), the image's header is read first and anything else is
    refused before a pixel is decoded, so a small file that claims a huge image (a
    decompression bomb) costs nothing. Pillow's own bomb guard is caught too.
    """
    if not isinstance(data, str):
        raise BadMessageError("bad_field:image", f"not a string: {data!r:.40}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadMessageError("bad_image", f"not base64: {exc}") from None
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
            if size is not None and image.size != size:
                raise BadMessageError("image_size", f"{image.size[0]}x{image.size[1]}, expected {size[0]}x{size[1]}")
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise BadMessageError("image_size", f"refused by Pillow: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # what Pillow raises for corrupt data
        raise BadMessageError("bad_image", f"{type(exc).__name__}: {exc}") from None


def parse_numbers(message: dict[str, Any]) -> dict[str, float]:
    """The numeric fields the agent uses: finite numbers, or numeric strings; raises BadMessageError."""
    numbers: dict[str, float] = {}
    for key in NUMBER_FIELDS:
        if key in message:
            try:
                numbers[key] = get_float(message, key)
            except ProtocolError as exc:
                raise BadMessageError(f"bad_field:{key}", str(exc)) from None
    return numbers
