"""A Donkey simulator client built the way gym-donkeycar's is, for tests against the twin.

gym-donkeycar (1.3.x and HEAD) is not installable here, so this follows its structure as
shared/reference/donkey-sim-protocol.md describes it (``gym_donkeycar/core/client.py``,
``sim_client.py``, ``envs/donkey_sim.py``), keeping exactly the parts that decide whether a
reply gets lost:

- ``SDClient.__init__`` connects and **starts its reader thread**; only afterwards does
  ``SimClient.__init__`` call the handler's ``on_connect``, which sets ``handler.client``.
- The reader polls a non-blocking socket (1 ms sleeps), waits until its buffer holds
  ``}\\n``, takes from the first ``{`` to the last ``}\\n``, splits on newlines, parses each line.
- The handler answers ``scene_selection_ready`` with ``get_scene_names``, loads its scene
  from ``scene_names`` (raising in the reader thread when the name is missing, as gym does),
  and on ``car_loaded`` sends the hand brake, then ``car_config`` and ``cam_config``.
  Every send goes through ``handler.client``; while it is still None the message is skipped
  (gym logs "skipping" at debug level): that is the loss this client counts.
- Start-line crossings are counted by gym's ``on_collision_with_starting_line``.

Left out: the 0.1 s sleeps after each config message (they come after the race and only
slow a test down) and everything about rewards and episodes.
"""

from __future__ import annotations

import base64
import io
import json
import select
import socket
import threading
import time
from typing import Any

from PIL import Image


class GymStyleHandler:
    """``DonkeyUnitySimHandler``, reduced to the handshake, the config and lap counting."""

    def __init__(self, scene: str, conf: dict[str, Any]) -> None:
        self.scene = scene
        self.conf = conf
        self.client: GymStyleClient | None = None
        self.loaded = False
        self.skipped: list[str] = []  # messages lost because handler.client was still None
        self.reader_error: BaseException | None = None
        self.image_sizes: list[tuple[int, int]] = []
        self.current_lap_time = 0.0
        self.starting_line_index = -1
        self.lap_count = 0

    def on_connect(self, client: GymStyleClient) -> None:
        self.client = client

    def on_recv_message(self, message: dict[str, Any]) -> None:
        kind = message.get("msg_type")
        if kind == "scene_selection_ready":
            self.queue_message({"msg_type": "get_scene_names"})
        elif kind == "scene_names":
            names = message["scene_names"]
            if self.scene not in names:
                raise ValueError(f"Scene name {self.scene} not in scene list {names}")
            self.queue_message({"msg_type": "load_scene", "scene_name": self.scene})
        elif kind == "car_loaded":
            self.loaded = True
            self.queue_message({"msg_type": "control", "steering": "0", "throttle": "0", "brake": "1.0"})
            self.send_config()
        elif kind == "telemetry":
            image = Image.open(io.BytesIO(base64.b64decode(message["image"])))
            self.image_sizes.append(image.size)
        elif kind == "collision_with_starting_line":
            if self.current_lap_time == 0.0:
                self.current_lap_time = message["timeStamp"]
                self.starting_line_index = message["starting_line_index"]
            elif self.starting_line_index == message["starting_line_index"]:
                self.current_lap_time = message["timeStamp"]
                self.lap_count += 1

    def send_config(self) -> None:
        style = self.conf["car_config"]
        self.blocking_send({"msg_type": "car_config", "body_style": style["body_style"],
                            "body_r": str(style["body_rgb"][0]), "body_g": str(style["body_rgb"][1]),
                            "body_b": str(style["body_rgb"][2]), "car_name": style["car_name"],
                            "font_size": str(style["font_size"])})
        camera = {"img_w": 0, "img_h": 0, "img_d": 0, "img_enc": 0, "fov": 0, "fish_eye_x": 0.0,
                  "fish_eye_y": 0.0, "offset_x": 0.0, "offset_y": 0.0, "offset_z": 0.0, "rot_x": 0.0,
                  "rot_y": 0.0, "rot_z": 0.0, **self.conf["cam_config"]}
        self.blocking_send({"msg_type": "cam_config", **{key: str(value) for key, value in camera.items()}})

    def blocking_send(self, message: dict[str, Any]) -> None:
        if self.client is None:
            self.skipped.append(message["msg_type"])
            return
        self.client.send_now(message)

    def queue_message(self, message: dict[str, Any]) -> None:
        if self.client is None:
            self.skipped.append(message["msg_type"])
            return
        self.client.queue_message(message)


class GymStyleClient:
    """``SDClient`` + ``SimClient``: the reader thread starts before the handler knows the client."""

    def __init__(self, host: str, port: int, handler: GymStyleHandler, poll_socket_sleep_time: float = 0.001):
        self.handler = handler
        self.poll_socket_sleep_sec = poll_socket_sleep_time
        self.msg: str | None = None  # the lossy single-slot queue
        self.aborted = False
        self.do_process_msgs = True
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.connect((host, port))
        self.th = threading.Thread(target=self.proc_msg, daemon=True)
        self.th.start()
        handler.on_connect(self)  # SimClient.__init__, after SDClient.__init__ returned

    def send_now(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode("utf-8"))

    def queue_message(self, message: dict[str, Any]) -> None:
        self.msg = json.dumps(message)

    def stop(self) -> None:
        self.do_process_msgs = False
        self.th.join(5)
        self.sock.close()

    def proc_msg(self) -> None:
        self.sock.setblocking(False)
        buffer = ""
        try:
            while self.do_process_msgs:
                time.sleep(self.poll_socket_sleep_sec)
                readable, writable, _ = select.select([self.sock], [self.sock], [], 0)
                if readable:
                    data = self.sock.recv(1024 * 256)
                    if not data:
                        break
                    buffer += data.decode("utf-8")
                    if "}\n" in buffer:
                        start, end = buffer.find("{"), buffer.rfind("}\n")
                        chunk, buffer = buffer[start:end + 1], buffer[end + 2:]
                        for line in chunk.split("\n"):
                            if line.strip():
                                self.handler.on_recv_message(json.loads(line))
                if writable and self.msg is not None:
                    message, self.msg = self.msg, None
                    self.sock.sendall(message.encode("utf-8"))
        except BaseException as exc:  # gym prints it and marks the client aborted: the env then hangs
            self.handler.reader_error = exc
            self.aborted = True
