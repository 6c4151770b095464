"""Closed tracks: a centreline sampled by arc length, a road width, and projection onto it.

Coordinates follow the Unity simulator's ground plane: ``x`` to the right, ``z`` forward,
metres, for a 1/10-scale car. A heading (yaw) of 0 faces +z and increases clockwise seen
from above, so positive steering (right) increases yaw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np
from numpy.typing import NDArray

SAMPLE_SPACING = 0.05  # metres between centreline samples (also the protocol's path nodes)


@dataclass(frozen=True)
class Projection:
    """Where a point lies relative to the centreline."""

    progress: float  # arc length from the start line, [0, length)
    cte: float  # signed cross-track error, metres; positive = right of the centreline
    node: int  # index of the nearest centreline sample
    heading: float  # centreline heading at that point, radians (Unity yaw convention)


@dataclass(frozen=True, eq=False)  # identity equality: a track is hashable, cacheable
class Track:
    """A closed track. Build one with ``Track.from_polyline`` or get a named one with ``get_track``."""

    name: str
    description: str
    width: float  # road width, metres (edge line to edge line)
    points: NDArray[np.float64] = field(repr=False)  # (N, 2) x, z samples, evenly spaced
    length: float = 0.0

    @property
    def half_width(self) -> float:
        return self.width / 2

    @property
    def node_count(self) -> int:
        return len(self.points)

    @classmethod
    def from_polyline(cls, name: str, description: str, width: float, polyline: NDArray[np.float64]) -> Track:
        """Resample a dense closed polyline (first point not repeated) to even arc-length spacing."""
        closed = np.vstack([polyline, polyline[:1]])
        seg = np.hypot(*np.diff(closed, axis=0).T)
        cumulative = np.concatenate([[0.0], np.cumsum(seg)])
        length = float(cumulative[-1])
        count = max(16, round(length / SAMPLE_SPACING))
        s = np.linspace(0.0, length, count, endpoint=False)
        x = np.interp(s, cumulative, closed[:, 0])
        z = np.interp(s, cumulative, closed[:, 1])
        return cls(name=name, description=description, width=width, points=np.column_stack([x, z]), length=length)

    @property
    def spacing(self) -> float:
        return self.length / self.node_count

    def tangents(self) -> NDArray[np.float64]:
        """Unit tangent at each sample (central difference on the closed loop)."""
        diff = np.roll(self.points, -1, axis=0) - np.roll(self.points, 1, axis=0)
        return diff / np.hypot(*diff.T)[:, None]

    def headings(self) -> NDArray[np.float64]:
        tangent = self.tangents()
        return np.arctan2(tangent[:, 0], tangent[:, 1])

    def curvature(self) -> NDArray[np.float64]:
        """Signed curvature (1/m) at each sample; positive turns right."""
        heading = self.headings()
        turn = np.roll(heading, -1) - np.roll(heading, 1)
        turn = (turn + math.pi) % (2 * math.pi) - math.pi
        return turn / (2 * self.spacing)

    def point_at(self, progress: float) -> tuple[float, float, float]:
        """Interpolated (x, z, heading) at an arc length (wraps around the loop)."""
        position = (progress % self.length) / self.spacing
        i = int(position) % self.node_count
        j = (i + 1) % self.node_count
        frac = position - int(position)
        x, z = self.points[i] * (1 - frac) + self.points[j] * frac
        dx, dz = self.points[j] - self.points[i]
        return float(x), float(z), math.atan2(dx, dz)

    def project(self, x: float, z: float, hint: int | None = None, window: int = 40) -> Projection:
        """Project a point onto the centreline.

        With ``hint`` (the previous nearest node) only a window around it is searched, which
        keeps per-step projection O(1); a point far from that window falls back to a full search.
        """
        n = self.node_count
        if hint is None:
            candidates = self.points
            offset = 0
        else:
            idx = (np.arange(hint - window, hint + window + 1)) % n
            candidates = self.points[idx]
            offset = hint - window
        d2 = (candidates[:, 0] - x) ** 2 + (candidates[:, 1] - z) ** 2
        k = int(np.argmin(d2))
        if hint is not None and (k in (0, len(candidates) - 1) or d2[k] > (2 * self.width) ** 2):
            return self.project(x, z, hint=None)
        node = (k + offset) % n
        # Refine on the better of the two segments around the node.
        best: tuple[float, float, float] | None = None
        for a, b in (((node - 1) % n, node), (node, (node + 1) % n)):
            ax, az = self.points[a]
            bx, bz = self.points[b]
            sx, sz = bx - ax, bz - az
            seg_len2 = sx * sx + sz * sz
            t = min(1.0, max(0.0, ((x - ax) * sx + (z - az) * sz) / seg_len2))
            px, pz = ax + t * sx, az + t * sz
            dist2 = (x - px) ** 2 + (z - pz) ** 2
            if best is None or dist2 < best[0]:
                # Right of the direction of travel is where cross(tangent, offset) points down
                # in a y-up, left-handed frame: tangent (sx, sz), offset (ox, oz).
                cross = sz * (x - px) - sx * (z - pz)
                seg_len = math.sqrt(seg_len2)
                signed = math.copysign(math.sqrt(dist2), cross) if dist2 > 0 else 0.0
                progress = (a * self.spacing + t * seg_len) % self.length
                best = (dist2, signed, progress)
                heading = math.atan2(sx, sz)
        assert best is not None
        return Projection(progress=best[2], cte=best[1], node=node, heading=heading)

    def min_clearance(self) -> float:
        """Smallest distance between centreline points that are far apart along the track.

        A value above the road width means the road never overlaps itself.
        """
        pts = self.points[:: max(1, int(0.2 / self.spacing))]
        n = len(pts)
        step = self.length / n
        d = np.hypot(pts[:, None, 0] - pts[None, :, 0], pts[:, None, 1] - pts[None, :, 1])
        idx = np.arange(n)
        along = np.abs(idx[:, None] - idx[None, :])
        along = np.minimum(along, n - along) * step
        mask = along > 3 * self.width
        return float(d[mask].min())


def _polar_loop(radius_fn, samples: int = 4000) -> NDArray[np.float64]:
    theta = np.linspace(0.0, 2 * math.pi, samples, endpoint=False)
    r = radius_fn(theta)
    # Clockwise seen from above in the x-right/z-forward frame, so the loop turns right.
    return np.column_stack([r * np.sin(theta), r * np.cos(theta)])


def _start_at_straightest(polyline: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rotate the loop so it starts at its straightest stretch (a start line on a straight)."""
    diff = np.roll(polyline, -1, axis=0) - polyline
    heading = np.unwrap(np.arctan2(diff[:, 0], diff[:, 1]))
    turn = np.abs(np.gradient(heading))
    window = max(3, len(polyline) // 40)
    smooth = np.convolve(np.concatenate([turn, turn[:window]]), np.ones(window) / window, mode="valid")
    return np.roll(polyline, -int(np.argmin(smooth[: len(polyline)])), axis=0)


def _generated_track() -> Track:
    # An easy, gently curving closed loop, ~43 m: a lap takes ~29 s at the 1.5 m/s demo speed.
    line = _polar_loop(lambda t: 6.5 + 0.9 * np.sin(2 * t) + 0.35 * np.cos(3 * t + 0.4))
    line[:, 0] *= 1.05
    return Track.from_polyline(
        "generated_track",
        "easy closed loop with gentle curves (default)",
        width=1.2,
        polyline=_start_at_straightest(line),
    )


def _mountain_track() -> Track:
    # Twisty: three tight lobes joined by S-bends, radius down to ~0.95 m, a narrower road.
    line = _polar_loop(lambda t: 7.0 + 1.8 * np.sin(3 * t) + 0.3 * np.cos(7 * t + 0.3), samples=6000)
    return Track.from_polyline(
        "mountain_track",
        "twisty loop with tight lobes and S-bends, narrower road (hard)",
        width=0.9,
        polyline=_start_at_straightest(line),
    )


def _warehouse() -> Track:
    # A wide loop round a warehouse floor: long straights joined by rounded corners (a superellipse),
    # radius down to ~2.3 m, road 1.8 m wide: forgiving, for first models.
    theta = np.linspace(0.0, 2 * math.pi, 6000, endpoint=False)
    r = (np.abs(np.cos(theta) / 8.0) ** 4 + np.abs(np.sin(theta) / 5.0) ** 4) ** -0.25
    line = np.column_stack([r * np.sin(theta), r * np.cos(theta)])
    return Track.from_polyline(
        "warehouse",
        "wide loop with long straights and rounded corners, road 1.8 m (easy)",
        width=1.8,
        polyline=_start_at_straightest(line),
    )


GENERATED_ROAD_WIDTH = 1.0
GENERATED_ROAD_MIN_RADIUS = 1.5  # metres: the expert and the shipped model take these at cruise speed


@lru_cache(maxsize=16)
def generated_road(seed: int) -> Track:
    """A random closed road made from ``seed``: the same seed gives the same road.

    Unity's ``generated_road`` scene lays a new random road on every load; the twin's server
    passes a new seed on every load for the same effect. Random harmonics of a circle, kept only
    when no curve is tighter than GENERATED_ROAD_MIN_RADIUS and the road never comes near itself.
    """
    rng = np.random.default_rng(seed)
    harmonics = np.arange(2, 6)
    strength = np.array([1.2, 0.8, 0.5, 0.3])  # metres of radius per harmonic, at most
    for _ in range(100):
        amplitude = rng.uniform(0.0, 1.0, len(harmonics)) * strength
        phase = rng.uniform(0.0, 2 * math.pi, len(harmonics))
        base = rng.uniform(6.0, 7.5)

        def radius(t: NDArray[np.float64], amplitude: NDArray[np.float64] = amplitude,
                   phase: NDArray[np.float64] = phase, base: float = base) -> NDArray[np.float64]:
            return base + (amplitude[:, None] * np.sin(harmonics[:, None] * t + phase[:, None])).sum(axis=0)

        line = _polar_loop(radius, samples=6000)
        line[:, 0] *= rng.uniform(0.85, 1.15)
        track = Track.from_polyline(
            "generated_road",
            f"a random road from seed {seed}, road 1.0 m",
            width=GENERATED_ROAD_WIDTH,
            polyline=_start_at_straightest(line),
        )
        if (1 / np.abs(track.curvature()).max() >= GENERATED_ROAD_MIN_RADIUS
                and track.min_clearance() > track.width + 1.0):
            return track
    raise RuntimeError(f"no drivable road from seed {seed}")  # not seen in 10,000 seeds


_BUILDERS = {
    "generated_track": _generated_track,
    "mountain_track": _mountain_track,
    "warehouse": _warehouse,
    "generated_road": lambda: generated_road(0),
}
DEFAULT_TRACK = "generated_track"


def track_names() -> list[str]:
    """The geometries the twin has (scene names that map onto them are in ``simulator.scenes``)."""
    return list(_BUILDERS)


@cache
def get_track(name: str) -> Track:
    """A named track (cached; tracks are immutable). Raises KeyError naming the known tracks.

    ``generated_road`` by name is the road of seed 0; the server asks ``generated_road(seed)``.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown track {name!r}; known tracks: {', '.join(_BUILDERS)}") from None
    return builder()
