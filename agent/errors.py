"""The root of every error the agent raises on purpose.

Each subclass also inherits the builtin it most resembles (as gpiozero's exceptions do), so a
caller may catch ``AgentError`` for "anything the agent reports", or the builtin it already
handles (``OSError`` for an actuator, ``ValueError`` for bad input) without knowing our names.
"""

from __future__ import annotations


class AgentError(Exception):
    """Something the agent detected and can explain: the message names what is wrong."""
