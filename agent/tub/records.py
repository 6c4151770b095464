"""From a record (the drive loop's values) to a catalog line and encoded images, before any disk I/O.

Everything that can reject a record happens here, so a value that cannot be stored (a
non-finite float, a wrong shape, an image mode the format cannot hold) raises TubFormatError
before the writer touches the disk. Images are encoded in memory, so the disk sees one plain
write per image.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from agent.tub.layout import TubFormatError, image_file_name

EncodedImage = tuple[str, bytes]  # file name, encoded bytes


def encode_image(image: Image.Image, fmt: str, key: str) -> bytes:
    """Encode in memory (the same bytes Pillow writes to a file) so the disk sees one plain write."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError) as exc:  # e.g. "cannot write mode RGBA as JPEG"
        raise TubFormatError(f"record key {key!r}: cannot encode a {image.mode} image as {fmt}: {exc}") from exc
    return buffer.getvalue()


def convert_record(
    record: Mapping[str, Any], input_types: Mapping[str, str], index: int
) -> tuple[dict[str, Any], list[EncodedImage]]:
    """The record's stored values (keys outside ``input_types`` and None values are skipped) and its images."""
    contents: dict[str, Any] = {}
    images: list[EncodedImage] = []
    for key, value in record.items():
        if value is None or key not in input_types:
            continue
        kind = input_types[key]
        try:
            if kind == "float":
                number = float(value)
                if not math.isfinite(number):
                    raise TubFormatError(f"record key {key!r}: {number} is not a finite number")
                contents[key] = number
            elif kind == "int":
                contents[key] = int(value)
            elif kind == "str":
                contents[key] = str(value)
            elif kind == "boolean":
                contents[key] = bool(value)
            elif kind == "nparray":
                contents[key] = np.asarray(value).tolist()
            elif kind in ("list", "vector"):
                contents[key] = [v.item() if isinstance(v, np.generic) else v for v in value]
            elif kind == "image_array":
                array = np.asarray(value)
                if array.ndim not in (2, 3) or array.size == 0:
                    raise TubFormatError(f"record key {key!r}: image of shape {array.shape} is not H×W[×C]")
                name = image_file_name(index, key)
                images.append((name, encode_image(Image.fromarray(np.uint8(array)), "JPEG", key)))
                contents[key] = name
            elif kind == "gray16_array":
                name = image_file_name(index, key, ".png")
                images.append((name, encode_image(Image.fromarray(np.uint16(value)), "PNG", key)))
                contents[key] = name
        except TubFormatError:
            raise
        except (TypeError, ValueError) as exc:
            raise TubFormatError(
                f"record key {key!r}: cannot store {type(value).__name__} as {kind}: {exc}"
            ) from exc
    return contents, images


def catalog_line(contents: dict[str, Any], index: int, session_id: str) -> bytes:
    """The record's catalog line, with DonkeyCar's bookkeeping fields (``contents`` gains them too)."""
    contents["_timestamp_ms"] = round(time.time() * 1000)
    contents["_index"] = index
    contents["_session_id"] = session_id
    line = json.dumps(contents, allow_nan=False, sort_keys=True, ensure_ascii=True) + "\n"
    return line.encode("ascii")
