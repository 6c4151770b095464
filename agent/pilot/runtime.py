"""Which LiteRT runtime to use: ai-edge-litert (maintained), else tflite-runtime (frozen at 2.14)."""

from __future__ import annotations

import importlib
from typing import Any

from agent.errors import AgentError

RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


class RuntimeUnavailableError(AgentError, ImportError):
    pass


def interpreter_class() -> tuple[type[Any], str]:
    """The Interpreter class and the module it came from, in our order of preference."""
    errors = []
    for name in RUNTIMES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        return module.Interpreter, name.split(".")[0]
    raise RuntimeUnavailableError(
        "no TensorFlow Lite runtime: install ai-edge-litert (pip install ai-edge-litert) "
        f"or tflite-runtime ({'; '.join(errors)})"
    )
