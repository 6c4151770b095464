"""Scene names as the Unity simulator offers them, and the twin geometry that serves each one.

gym-donkeycar registers one environment id per scene and loads it by name; a name missing
from ``scene_names`` makes its client raise in its reader thread (the env then hangs), so the
twin offers every one. Four have geometry of their own (``generated_track``,
``mountain_track``, ``warehouse``, and ``generated_road``, a new random road on each load as
in Unity); the other scenes are served by the twin track closest in character, with a
warning naming the substitution, and the summary says which geometry served each car.
None of the geometry is Unity's: the names are there so that clients resolve.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.track import Track, generated_road, get_track


@dataclass(frozen=True)
class Scene:
    name: str  # as Unity names it, and as gym-donkeycar asks for it
    geometry: str  # the twin track that serves it
    env_id: str  # gym-donkeycar's environment id

    @property
    def substituted(self) -> bool:
        return self.name != self.geometry


# Unity's order (gym-donkeycar's early clients load by index into this list).
SCENES = (
    Scene("generated_road", "generated_road", "donkey-generated-roads-v0"),
    Scene("warehouse", "warehouse", "donkey-warehouse-v0"),
    Scene("sparkfun_avc", "warehouse", "donkey-avc-sparkfun-v0"),  # a wide loop on a car park
    Scene("generated_track", "generated_track", "donkey-generated-track-v0"),
    Scene("mountain_track", "mountain_track", "donkey-mountain-track-v0"),
    Scene("roboracingleague_1", "mountain_track", "donkey-roboracingleague-track-v0"),  # twisty, narrow
    Scene("waveshare", "generated_track", "donkey-waveshare-v0"),  # a small mat track, gentle curves
    Scene("mini_monaco", "mountain_track", "donkey-minimonaco-track-v0"),  # tight street circuit
    Scene("warren", "generated_track", "donkey-warren-track-v0"),
    Scene("thunderhill", "generated_track", "donkey-thunderhill-track-v0"),
    Scene("circuit_launch", "warehouse", "donkey-circuit-launch-track-v0"),  # an indoor track
)
_BY_NAME = {scene.name: scene for scene in SCENES}


def scene_names() -> list[str]:
    """What ``get_scene_names`` answers: every scene gym-donkeycar has an environment id for."""
    return [scene.name for scene in SCENES]


def get_scene(name: str) -> Scene:
    """The scene of that name; KeyError naming the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown scene {name!r}; known scenes: {', '.join(_BY_NAME)}") from None


def scene_track(scene: Scene, road_seed: int = 0) -> Track:
    """The geometry for one load of ``scene``: ``generated_road`` is a new road for each seed."""
    if scene.geometry == "generated_road":
        return generated_road(road_seed)
    return get_track(scene.geometry)
