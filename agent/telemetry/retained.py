"""Read one retained message from the fleet broker (for doctor): connect, subscribe, wait briefly, leave."""

from __future__ import annotations

import contextlib
import threading
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import TelemetryConfig


def read_retained(config: TelemetryConfig, topic: str, wait_s: float) -> tuple[bytes | None, str]:
    """(payload, "") for the retained message on ``topic``; (None, "") if there is none; (None, why) on failure."""
    url = urlparse(str(config.url))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if config.protocol == "5" else
                         mqtt.MQTTv311)
    if url.scheme == "mqtts":
        import ssl

        try:
            context = ssl.create_default_context(cafile=str(config.ca) if config.ca else None)
            if config.cert is not None:
                context.load_cert_chain(str(config.cert), str(config.key) if config.key else None)
        except (OSError, ssl.SSLError) as exc:
            return None, f"TLS: {exc}"
        client.tls_set_context(context)
    if config.username:
        client.username_pw_set(config.username, config.password)
    got: list[bytes] = []
    subscribed, done = threading.Event(), threading.Event()

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe(topic, qos=1)

    def on_subscribe(*_: Any) -> None:
        subscribed.set()

    def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            got.append(bytes(message.payload))
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(str(url.hostname or "localhost"), url.port or (8883 if url.scheme == "mqtts" else 1883),
                       keepalive=10)
    except OSError as exc:
        return None, f"cannot reach the broker: {exc}"
    client.loop_start()
    try:
        if not subscribed.wait(wait_s):
            return None, f"no answer from the broker within {wait_s:g} s"
        done.wait(min(1.0, wait_s))  # a retained message follows the SUBACK at once, or never
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()
    return (got[0] if got else None), ""
