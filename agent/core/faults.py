"""The faults the drive core knows, and which of them latch.

A latched fault stays until an explicit clear and survives a restart (it is persisted); the
others clear by themselves once their cause has been gone for ``fault_clear_hold_ms``.
"""

from __future__ import annotations

from enum import StrEnum


class Fault(StrEnum):
    STALE_FRAME = "stale_frame"  # the newest camera frame is too old (or there is none)
    CAMERA_ERROR = "camera_error"  # the camera backend raised
    INFERENCE_ERROR = "inference_error"  # the model raised or returned a non-finite value
    INFERENCE_OVERRUN = "inference_overrun"  # a streak of inferences over budget
    HEARTBEAT_LOST = "heartbeat_lost"  # no manual control in a mode that needs the operator
    ACTUATOR_FAILURE = "actuator_failure"  # a write failed twice in a row
    DRIVE_STALL = "drive_stall"  # the dead-man monitor saw the drive thread stop cycling
    ESTOP = "estop"  # an e-stop from any source
    UNCLEAN_EXIT = "unclean_exit"  # the previous run ended without stopping while the car drove
    ATTESTATION = "attestation"  # the attestation token was lost (expired, failed, revoked) while driving
    AWAITING_ATTESTATION = "awaiting_attestation"  # no valid token yet this run, in a mode that needs one


LATCHED = frozenset({Fault.ACTUATOR_FAILURE, Fault.DRIVE_STALL, Fault.ESTOP, Fault.UNCLEAN_EXIT,
                     Fault.ATTESTATION})
