"""Unity's per-field semantics for the configuration messages a client sends after ``car_loaded``.

The Unity simulator applies each field of ``cam_config``, ``cam_config_b``, ``car_config``
and ``racer_info`` on its own (``CameraSensor.SetConfig``, ``CarConfig.SetStyle``): the
encoding only when it is a three-letter name, the size only when width and height are
both non-zero, 0 keeping the current value everywhere. Clients rely on it: gym-donkeycar
sends ``"img_enc": "0"`` whenever the user leaves the encoding out, and its deprecated
top-level camera fields arrive as a ``cam_config`` with every other field ``"0"``. So a
field the twin cannot use is reported and skipped, and never costs the fields beside it.

The functions here are pure: they return the new settings and a list of ``Problem`` s,
and the session logs each kind once per peer.

Camera offsets follow Unity's ``transform.localPosition``: when any of ``offset_x/y/z`` is
non-zero all three are set, in Unity units relative to the car's origin. The twin divides
them by 8, the scale of every other distance in the protocol (``pos_*``, ``speed``), and
puts the car's origin 0.075 m above the ground, half a wheelbase ahead of the rear axle
(an estimate from the Donkey prefab's wheel positions, not verified), so ``offset_y = 1``
is the default lens height (0.20 m) and Unity-style ``offset_y = -0.2`` is a camera
0.05 m above the ground. Rotations follow ``localEulerAngles`` (any angle, wrapped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent.hw.donkeysim.framing import ProtocolError, get_float, get_str
from simulator.render import CameraConfig

UNITY_UNITS_PER_METRE = 8.0  # the protocol's ÷ 8 (docs/twin.md: thought to give 1/10 scale, unverified)
ORIGIN_HEIGHT_M = 0.075  # the car's origin above the ground, where camera offsets start
ORIGIN_FORWARD_M = 0.13  # ... and ahead of the rear axle (half the wheelbase)
MIN_LENS_HEIGHT_M = 0.01  # a lens at or under the ground sees nothing: lifted to this
MAX_OFFSET_UNITS = 400.0  # 50 m: anything further is not a camera on this car
MIN_SIDE = 8  # pixels; smaller requests are raised to this
DEFAULT_MAX_PIXELS = 640 * 480  # per camera, per peer: larger requests are scaled down
ENCODINGS = {"JPG": "JPEG", "PNG": "PNG", "TGA": "TGA"}  # wire name -> Pillow format
ENCODING_ALIASES = {"JPEG": "JPG"}  # a twin leniency: four letters, which Unity would ignore
BODY_STYLES = ("donkey", "bare", "car01", "f1", "cybertruck")
MAX_NAME = 64  # characters kept of a car or racer name (gym-donkeycar: "less than 64 char")


@dataclass(frozen=True)
class Problem:
    """A field that was not applied (or applied changed), logged once per peer and kind."""

    kind: str  # e.g. "cam_config.img_enc": the unit of once-per-peer logging
    detail: str


def _number(message: dict[str, Any], key: str, problems: list[Problem]) -> float | None:
    """The field as a finite number, None when absent or invalid (an invalid one is reported)."""
    if key not in message:
        return None
    try:
        return get_float(message, key)
    except ProtocolError as exc:
        problems.append(Problem(f"{message.get('msg_type')}.{key}", str(exc)))
        return None


def _integer(message: dict[str, Any], key: str, problems: list[Problem]) -> int | None:
    value = _number(message, key, problems)
    if value is None:
        return None
    if value != int(value) or abs(value) > 1e9:
        problems.append(Problem(f"{message.get('msg_type')}.{key}", f"{key}={value:g} is not a whole number"))
        return None
    return int(value)


def _wrap_degrees(angle: float) -> float:
    return (angle + 180.0) % 360.0 - 180.0


def apply_cam_config(
    message: dict[str, Any], base: CameraConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[CameraConfig, list[Problem]]:
    """``base`` with every valid, non-zero field of a ``cam_config`` (or ``cam_config_b``) applied."""
    kind = str(message.get("msg_type", "cam_config"))
    problems: list[Problem] = []
    changes: dict[str, Any] = {}

    def report(name: str, detail: str) -> None:
        problems.append(Problem(f"{kind}.{name}", detail))

    depth = _integer(message, "img_d", problems)
    if depth:
        if depth in (1, 3):
            changes["grayscale"] = depth == 1
        else:
            report("img_d", f"img_d={depth} is not 1 (grey) or 3 (colour); depth kept")

    width, height = _integer(message, "img_w", problems), _integer(message, "img_h", problems)
    if width or height:  # Unity: both non-zero, or the size is kept
        if not (width and height):
            report("img_w/img_h", f"img_w={width or 0}, img_h={height or 0}: both are needed; size kept")
        elif width < 0 or height < 0:
            report("img_w/img_h", f"img_w={width}, img_h={height}: negative; size kept")
        else:
            size = _bounded_size(width, height, max_pixels)
            if size != (width, height):
                report("camera size", f"{width}x{height} is over this twin's limit of {max_pixels} pixels "
                                      f"per camera (or under {MIN_SIDE} a side): sending {size[0]}x{size[1]}")
            changes["width"], changes["height"] = size

    if "img_enc" in message:
        try:
            encoding = get_str(message, "img_enc").strip().upper()
        except ProtocolError as exc:
            report("img_enc", str(exc))
        else:
            encoding = ENCODING_ALIASES.get(encoding, encoding)
            if encoding in ENCODINGS:
                changes["encoding"] = encoding
            elif encoding not in ("", "0"):  # "0" is gym-donkeycar's "keep the default"
                report("img_enc", f"img_enc={encoding[:16]!r} is not JPG, PNG or TGA; encoding kept")

    fov = _number(message, "fov", problems)
    if fov:
        if 0 < fov < 180:
            changes["fov"] = min(179.0, max(1.0, fov))
        else:
            report("fov", f"fov={fov:g} is outside (0, 180) degrees; kept")

    offsets = [_number(message, key, problems) or 0.0 for key in ("offset_x", "offset_y", "offset_z")]
    if any(offsets):  # Unity sets the whole localPosition when any component is non-zero
        if max(abs(v) for v in offsets) > MAX_OFFSET_UNITS:
            report("offset", f"offsets {offsets} are over {MAX_OFFSET_UNITS:g} Unity units; camera position kept")
        else:
            x, y, z = (v / UNITY_UNITS_PER_METRE for v in offsets)
            height_m = ORIGIN_HEIGHT_M + y
            if height_m < MIN_LENS_HEIGHT_M:
                report("offset_y", f"offset_y={offsets[1]:g} puts the lens {height_m:.3f} m above the ground; "
                                   f"raised to {MIN_LENS_HEIGHT_M} m")
                height_m = MIN_LENS_HEIGHT_M
            changes.update(right_m=x, height_m=height_m, forward_m=ORIGIN_FORWARD_M + z)

    rotations = [_number(message, key, problems) or 0.0 for key in ("rot_x", "rot_y", "rot_z")]
    if any(rotations):  # Unity sets the whole localEulerAngles
        changes.update(pitch=_wrap_degrees(rotations[0]), yaw=_wrap_degrees(rotations[1]),
                       roll=_wrap_degrees(rotations[2]))

    fisheye = [_number(message, key, problems) or 0.0 for key in ("fish_eye_x", "fish_eye_y")]
    if any(fisheye):
        report("fish_eye", f"fish_eye_x/y={fisheye} ignored: the twin renders a pinhole camera only")
    return base.with_overrides(**changes), problems


def _bounded_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The requested size, scaled down (aspect kept) to ``max_pixels`` and up to ``MIN_SIDE``."""
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    return max(MIN_SIDE, width), max(MIN_SIDE, height)


@dataclass(frozen=True)
class CarStyle:
    """What ``car_config`` and ``racer_info`` set; kept for the summary (the body is not rendered)."""

    car_name: str = ""
    body_style: str = "donkey"
    body_rgb: tuple[int, int, int] = (255, 255, 255)
    font_size: int = 100
    racer_name: str = ""
    country: str = ""


def _text(message: dict[str, Any], key: str, problems: list[Problem], limit: int = MAX_NAME) -> str | None:
    if key not in message:
        return None
    try:
        value = get_str(message, key)
    except ProtocolError as exc:
        problems.append(Problem(f"{message.get('msg_type')}.{key}", str(exc)))
        return None
    if len(value) > limit:
        problems.append(Problem(f"{message.get('msg_type')}.{key}", f"{key} is {len(value)} characters; "
                                                                    f"the first {limit} are kept"))
    return value[:limit]


def apply_car_config(message: dict[str, Any], base: CarStyle) -> tuple[CarStyle, list[Problem]]:
    """``base`` with every valid field of a ``car_config`` applied."""
    problems: list[Problem] = []
    changes: dict[str, Any] = {}
    style = _text(message, "body_style", problems)
    if style is not None:
        if style in BODY_STYLES:
            changes["body_style"] = style
        else:
            problems.append(Problem("car_config.body_style", f"body_style={style!r} is not one of {BODY_STYLES}"))
    rgb = list(base.body_rgb)
    for index, key in enumerate(("body_r", "body_g", "body_b")):
        value = _integer(message, key, problems)
        if value is not None:
            if 0 <= value <= 255:
                rgb[index] = value
            else:
                problems.append(Problem(f"car_config.{key}", f"{key}={value} is outside 0..255"))
    changes["body_rgb"] = tuple(rgb)
    name = _text(message, "car_name", problems)
    if name is not None and name != "Racer Name":  # Unity ignores its own placeholder
        changes["car_name"] = name
    font_size = _integer(message, "font_size", problems)
    if font_size is not None:
        if 0 < font_size <= 1000:
            changes["font_size"] = font_size
        else:
            problems.append(Problem("car_config.font_size", f"font_size={font_size} is outside 1..1000"))
    return CarStyle(**{**base.__dict__, **changes}), problems


def apply_racer_info(message: dict[str, Any], base: CarStyle) -> tuple[CarStyle, list[Problem]]:
    """``base`` with the racer's name, car name and country from a ``racer_info`` (bio and guid are not kept)."""
    problems: list[Problem] = []
    changes: dict[str, Any] = {}
    for key in ("racer_name", "car_name", "country"):
        value = _text(message, key, problems)
        if value:
            changes[key] = value
    for key in ("bio", "guid"):
        _text(message, key, problems, limit=10_000)  # type-checked only
    return CarStyle(**{**base.__dict__, **changes}), problems
