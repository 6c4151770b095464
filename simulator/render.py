"""A numpy camera for the twin: road, lane and edge lines, grass, horizon and sky.

The camera is fixed to the car, so every pixel's ray hits the ground at a point that is
constant *in the car's frame*. Those points are computed once per camera configuration;
a frame is then one rotation and translation of ~15k points and a lookup into a
pre-rendered, mip-mapped top-down texture of the world. Per-pixel mip levels (from each
pixel's ground footprint) keep distant lines from flickering. Everything is seeded, so a
given seed and pose sequence renders identical frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from simulator.track import Track

TEXTURE_RESOLUTION = 0.02  # metres per texel at mip level 0
MIP_LEVELS = 5
TEXTURE_MARGIN = 4.0  # metres of grass around the track's bounding box
HAZE_DISTANCE = 25.0  # metres; distant ground fades towards the horizon colour

LABEL_GRASS, LABEL_ROAD, LABEL_EDGE, LABEL_CENTRE, LABEL_START = range(5)
EDGE_LINE_WIDTH = 0.05
CENTRE_LINE_WIDTH = 0.04
DASH_PERIOD, DASH_LENGTH = 0.6, 0.3
START_LINE_DEPTH = 0.08

PALETTE = np.array(
    [
        (74, 112, 52),  # grass
        (88, 88, 94),  # asphalt
        (236, 236, 232),  # edge lines
        (232, 196, 44),  # dashed centre line
        (245, 245, 245),  # start line
    ],
    dtype=np.float32,
)
SKY_TOP = np.array((120, 170, 225), dtype=np.float32)
SKY_HORIZON = np.array((205, 218, 230), dtype=np.float32)


@dataclass(frozen=True)
class CameraConfig:
    """Camera geometry and output format; the fields mirror the protocol's ``cam_config``."""

    width: int = 160
    height: int = 120
    fov: float = 50.0  # vertical field of view, degrees (Unity's Camera.fieldOfView)
    height_m: float = 0.20  # lens height above the ground (offset_y)
    forward_m: float = 0.15  # ahead of the rear axle (offset_z)
    right_m: float = 0.0  # offset_x
    pitch: float = 15.0  # degrees down (rot_x)
    yaw: float = 0.0  # degrees to the right (rot_y)
    roll: float = 0.0  # degrees, counter-clockwise seen from behind the camera (rot_z)
    grayscale: bool = False  # img_d = 1: three identical grey channels
    encoding: str = "JPG"  # JPG, PNG or TGA

    def with_overrides(self, **changes: object) -> CameraConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Randomization:
    """Optional domain randomisation for training data; all zero renders a clean world."""

    lighting: float = 0.0  # ± fraction of brightness, drawn per episode
    texture: float = 0.0  # 0..1 strength of colour jitter and ground texture
    noise: float = 0.0  # camera noise standard deviation, in 8-bit intensity units

    @property
    def enabled(self) -> bool:
        return self.lighting > 0 or self.texture > 0 or self.noise > 0


@lru_cache(maxsize=4)  # a new generated road each load must not pile up rasters
def _label_raster(track: Track) -> tuple[NDArray[np.uint8], float, float]:
    """Top-down labels of the world at TEXTURE_RESOLUTION, painted road, then lines on top."""
    lo = track.points.min(axis=0) - TEXTURE_MARGIN
    hi = track.points.max(axis=0) + TEXTURE_MARGIN
    size = np.ceil((hi - lo) / TEXTURE_RESOLUTION).astype(int)
    size = ((size + 2**MIP_LEVELS - 1) // 2**MIP_LEVELS) * 2**MIP_LEVELS  # divisible for mips
    labels = np.full((size[1], size[0]), LABEL_GRASS, dtype=np.uint8)

    step = TEXTURE_RESOLUTION / 2
    s = np.arange(0.0, track.length, step)
    cumulative = np.arange(track.node_count + 1) * track.spacing
    closed = np.vstack([track.points, track.points[:1]])
    cx = np.interp(s, cumulative, closed[:, 0])
    cz = np.interp(s, cumulative, closed[:, 1])
    heading = np.interp(s, cumulative, np.unwrap(np.append(track.headings(), track.headings()[0])))
    right_x, right_z = np.cos(heading), -np.sin(heading)
    half = track.half_width
    offsets = np.arange(-half, half + step, step)

    def paint(lateral: NDArray[np.float64], along: NDArray[np.bool_], label: int) -> None:
        d = lateral[None, :]
        px = cx[along, None] + d * right_x[along, None]
        pz = cz[along, None] + d * right_z[along, None]
        ix = ((px - lo[0]) / TEXTURE_RESOLUTION).astype(np.int64).ravel()
        iz = ((pz - lo[1]) / TEXTURE_RESOLUTION).astype(np.int64).ravel()
        labels[iz, ix] = label

    everywhere = np.ones_like(s, dtype=bool)
    paint(offsets, everywhere, LABEL_ROAD)
    edge = offsets[np.abs(offsets) >= half - EDGE_LINE_WIDTH]
    paint(edge, everywhere, LABEL_EDGE)
    centre = offsets[np.abs(offsets) <= CENTRE_LINE_WIDTH / 2]
    paint(centre, (s % DASH_PERIOD) < DASH_LENGTH, LABEL_CENTRE)
    paint(offsets[np.abs(offsets) < half - EDGE_LINE_WIDTH], s < START_LINE_DEPTH, LABEL_START)
    return labels, float(lo[0]), float(lo[1])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> NDArray[np.float32]:
    """Blotchy noise in [-1, 1]: coarse random cells, bilinearly upsampled."""
    coarse = rng.uniform(-1, 1, size=(shape[0] // cell + 2, shape[1] // cell + 2)).astype(np.float32)
    rows = np.arange(shape[0]) / cell
    cols = np.arange(shape[1]) / cell
    r0, c0 = rows.astype(int), cols.astype(int)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return (top * (1 - fr) + bottom * fr).astype(np.float32)


class WorldTexture:
    """The mip-mapped top-down colour texture of a track for one seed."""

    def __init__(self, track: Track, seed: int, texture: float = 0.0) -> None:
        labels, self.x0, self.z0 = _label_raster(track)
        rng = np.random.default_rng(seed)
        palette = PALETTE.copy()
        if texture > 0:
            palette *= rng.uniform(1 - 0.25 * texture, 1 + 0.25 * texture, size=(len(PALETTE), 3))
        colour = palette[labels]
        # Grass always has some blotchy variation (it gives the pilot optical flow);
        # asphalt a fine grain. Randomised texture makes both stronger.
        grass = labels == LABEL_GRASS
        blotch = _smooth_noise(rng, (labels.shape[0], labels.shape[1]), cell=25) * (10 + 25 * texture)
        grain = rng.normal(0, 3 + 6 * texture, size=labels.shape).astype(np.float32)
        colour += np.where(grass, blotch, grain)[..., None]
        self.levels: list[NDArray[np.uint8]] = []  # flattened (rows * cols, 3) per mip level
        self.shapes: list[tuple[int, int]] = []
        level = colour
        for _ in range(MIP_LEVELS):
            self.levels.append(np.clip(level, 0, 255).astype(np.uint8).reshape(-1, 3))
            self.shapes.append((level.shape[0], level.shape[1]))
            level = level.reshape(level.shape[0] // 2, 2, level.shape[1] // 2, 2, 3).mean(axis=(1, 3))


@lru_cache(maxsize=8)
def shared_texture(track: Track, seed: int, texture: float = 0.0) -> WorldTexture:
    """A WorldTexture shared by every car with the same track and seed (it is read-only)."""
    return WorldTexture(track, seed, texture)


def _unity_rotation(pitch: float, yaw: float, roll: float) -> NDArray[np.float64]:
    """Unity's ``localEulerAngles`` as a matrix on (right, up, forward) vectors: Ry(yaw) Rx(pitch) Rz(roll).

    Positive pitch looks down (rot_x = 90 looks straight at the ground), positive yaw turns
    right and positive roll turns the camera counter-clockwise seen from behind, as in Unity.
    """
    p, y, r = (math.radians(a) for a in (pitch, yaw, roll))
    around_x = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    around_y = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    around_z = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return around_y @ around_x @ around_z


class CameraRenderer:
    """Renders (H, W, 3) uint8 RGB frames for a car pose on a WorldTexture."""

    def __init__(self, texture: WorldTexture, config: CameraConfig) -> None:
        self.texture = texture
        self.config = config
        h, w = config.height, config.width
        focal = (h / 2) / math.tan(math.radians(config.fov) / 2)
        u = (np.arange(w) + 0.5 - w / 2) / focal
        v = (np.arange(h) + 0.5 - h / 2) / focal
        right_ray, down_ray = np.meshgrid(u, v)
        # Camera-frame rays (x right, y up, z forward) turned into the car's frame with Unity's
        # Euler order: roll about z first, then pitch about x, then yaw about y.
        rotation = _unity_rotation(config.pitch, config.yaw, config.roll)
        local = np.stack([right_ray, -down_ray, np.ones_like(right_ray)])
        right_ray, up, forward = np.einsum("ij,jhw->ihw", rotation, local)
        ground = up < -1e-3
        t = np.where(ground, config.height_m / np.where(ground, -up, 1.0), 0.0)  # 0 off the ground: no inf * 0
        distance = t * np.sqrt(forward**2 + right_ray**2)
        ground &= distance < 400.0

        # Sky and far-ground background, with a gradient down to the horizon.
        elevation = np.clip(up / np.sqrt(forward**2 + up**2 + right_ray**2), 0, 1)[..., None]
        sky = SKY_HORIZON * (1 - elevation) + SKY_TOP * elevation
        self._background = np.clip(sky, 0, 255).astype(np.float32)

        flat = np.flatnonzero(ground.ravel())
        fwd_g = (t * forward).ravel()[flat] + config.forward_m
        right_g = (t * right_ray).ravel()[flat] + config.right_m
        # Ground footprint of one pixel picks the mip level.
        ground_forward = np.where(ground, t * forward, 0.0)
        along = np.abs(np.diff(ground_forward, axis=0, append=ground_forward[-1:] * 2 - ground_forward[-2:-1]))
        footprint = np.maximum(np.where(ground, distance, 0.0) / focal, along).ravel()[flat]
        level = np.clip(np.floor(np.log2(np.maximum(footprint, 1e-9) / TEXTURE_RESOLUTION)), 0, MIP_LEVELS - 1)
        haze = (1 - np.exp(-distance.ravel()[flat] / HAZE_DISTANCE)).astype(np.float32)

        order = np.argsort(level, kind="stable")
        self._pixels = flat[order]
        self._forward = fwd_g[order].astype(np.float32)
        self._right = right_g[order].astype(np.float32)
        self._level_slices: list[tuple[int, slice]] = []
        sorted_levels = level[order].astype(int)
        for k in range(MIP_LEVELS):
            idx = np.flatnonzero(sorted_levels == k)
            if len(idx):
                self._level_slices.append((k, slice(int(idx[0]), int(idx[-1]) + 1)))
        haze = haze[order]
        self._keep = (1 - haze)[:, None]
        self._haze_colour = (haze[:, None] * SKY_HORIZON[None, :]).astype(np.float32)
        self._colours = np.empty((len(flat), 3), dtype=np.float32)
        self._frame = np.empty((h * w, 3), dtype=np.float32)

    def render(
        self,
        x: float,
        z: float,
        yaw: float,
        *,
        gain: float = 1.0,
        noise: NDArray[np.float32] | None = None,
    ) -> NDArray[np.uint8]:
        """One frame for the car at (x, z) with heading yaw; ``noise`` is added per pixel."""
        sin_yaw, cos_yaw = math.sin(yaw), math.cos(yaw)
        world_x = x + self._forward * sin_yaw + self._right * cos_yaw
        world_z = z + self._forward * cos_yaw - self._right * sin_yaw
        frame = self._frame
        frame[:] = self._background.reshape(-1, 3)
        colours = self._colours
        tex = self.texture
        for k, part in self._level_slices:
            res = TEXTURE_RESOLUTION * (2**k)
            rows, cols = tex.shapes[k]
            ix = np.clip(((world_x[part] - tex.x0) / res).astype(np.int64), 0, cols - 1)
            iz = np.clip(((world_z[part] - tex.z0) / res).astype(np.int64), 0, rows - 1)
            colours[part] = tex.levels[k][iz * cols + ix]
        colours *= self._keep
        colours += self._haze_colour
        frame[self._pixels] = colours
        if gain != 1.0:
            frame *= gain
        if noise is not None:
            frame += noise.reshape(-1, 3)
        out = np.clip(frame, 0, 255).astype(np.uint8).reshape(self.config.height, self.config.width, 3)
        if self.config.grayscale:
            grey = (out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.uint8)
            out = np.repeat(grey[..., None], 3, axis=2)
        return out
