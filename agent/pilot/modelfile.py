"""Just enough of the TFLite flatbuffer to vet a model file before the interpreter sees it.

The interpreter's own errors for a corrupt file or a model that needs TensorFlow's Flex
delegate do not say what is wrong in words a technician can act on; this module does: it
checks the file identifier and lists the custom operators (``Flex*`` ones need full
TensorFlow, which the car does not have).
"""

from __future__ import annotations

import struct
from pathlib import Path

import flatbuffers
from flatbuffers.table import Table

from agent.errors import AgentError

FILE_IDENTIFIER = b"TFL3"
_OPERATOR_CODES_FIELD = 6  # vtable offset of Model.operator_codes (field 1)
_CUSTOM_CODE_FIELD = 6  # vtable offset of OperatorCode.custom_code (field 1)


class ModelFileError(AgentError, ValueError):
    """Not a usable .tflite file; the message says why."""


def read_model(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the model: {exc.strerror}") from None
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise ModelFileError(f"{path}: not a TensorFlow Lite model (no TFL3 identifier; truncated or another format?)")
    return data


def custom_operators(data: bytes) -> list[str]:
    """Names of the custom operators a model uses, e.g. ``['FlexTensorListReserve']``."""
    try:
        buffer = bytearray(data)
        root = flatbuffers.encode.Get(flatbuffers.packer.uoffset, buffer, 0)
        model = Table(buffer, root)
        offset = model.Offset(_OPERATOR_CODES_FIELD)
        if not offset:
            return []
        start, count = model.Vector(offset), model.VectorLen(offset)
        names = []
        for i in range(count):
            code = Table(buffer, model.Indirect(start + 4 * i))
            custom = code.Offset(_CUSTOM_CODE_FIELD)
            if custom:
                names.append(code.String(custom + code.Pos).decode("utf-8", errors="replace"))
        return names
    except (IndexError, ValueError, UnicodeError, struct.error) as exc:  # a damaged flatbuffer
        raise ModelFileError(f"corrupt TensorFlow Lite flatbuffer: {exc}") from None
