"""``donkey-attest-bridge``: turns the Keylime verifier's verdicts into signed tokens on each car's MQTT topic.

Runs fleet-side, beside the verifier, with the verifier's admin mTLS identity and the fleet signing key (neither
ever on a car). Each poll asks the verifier about every car it serves, maps the answer (``verifier.map_status``)
to a token (``token.sign``) and publishes it retained (QoS 1, MQTT 5 message expiry = the token's lifetime) on
``donkey/<fleet>/<car>/attestation``. The verifier's revocation webhook publishes a ``revoked`` token at once.

Stateless: everything is rebuilt from the verifier and the broker's retained tokens. A ``revoked`` token stays
retained (no expiry), and a later ``pass`` is issued only once the verifier reports a successful attestation
after the revocation (so a poll racing the webhook cannot undo it). Several instances share a fleet: inbound
work (cars' refresh requests) arrives on an MQTT 5 shared subscription ``$share/<group>/...``, polling is split
by ``shard = "i/N"`` (a stable hash of the UUID), and any instance can take the webhook.

Policy requests (``policy_sync``): a car asks, before it opens a new model, that the model's digest be listed in
its named runtime policy. The request arrives on a shared subscription; the bridge checks it (the car's own UUID,
paths under ``policy_prefixes``, digests in ``policy_digests`` when set), merges it into the named policy on the
verifier (a union: never pruned here) and confirms on ``.../attestation/policy/ready`` once the verifier is sure
to validate the next quote against the new policy (``settle``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import ssl
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from agent.attest import token as tokens
from agent.attest.policy_sync import (
    PolicyReady,
    PolicyRequest,
    PolicySyncError,
    merge,
    parse_request,
    policy_filter,
    ready_topic,
)
from agent.attest.verifier import ATTESTING, VerifierClient, VerifierError, map_status
from agent.errors import AgentError

log = logging.getLogger("donkey.attest.bridge")
SHARE_GROUP = "donkey-attest-bridge"
REVOKED_LIFETIME_MS = 7 * 24 * 3600 * 1000  # a revoked token outlives any pass: it is the broker-held memory
READY_EXPIRY_S = 300.0  # a policy confirmation nobody took is of no use later (the car asks again)


class BridgeConfigError(AgentError, ValueError):
    pass


def attestation_topic(fleet: str, car: str) -> str:
    return f"donkey/{fleet}/{car}/attestation"


def refresh_filter(fleet: str, group: str = SHARE_GROUP) -> str:
    """Cars ask for a fresh token here (empty payload); one instance of the group takes each request."""
    return f"$share/{group}/donkey/{fleet}/+/attestation/refresh"


@dataclass
class BridgeConfig:
    fleet: str
    mqtt_url: str
    signing_key: Path
    verifier_url: str
    cars: dict[str, str]  # car id -> Keylime agent UUID
    verifier_ca: Path | None = None
    verifier_cert: Path | None = None
    verifier_key: Path | None = None
    api_version: str = "2.5"
    token_lifetime_s: float = 30.0
    poll_interval_s: float = 10.0
    max_attestation_age_s: float = 60.0
    webhook: str = "127.0.0.1:8990"  # host:port to listen on; "" = no webhook listener
    revocation_cert: Path | None = None  # verify the webhook's RSA-PSS signature with this certificate
    # keylime 7.14.3 posts the webhook over TLS whenever its trusted_server_ca is set (any URL scheme): the bridge's
    # certificate must chain to it; with webhook_client_ca the verifier's client certificate is required too.
    webhook_cert: Path | None = None
    webhook_key: Path | None = None
    webhook_client_ca: Path | None = None
    shard: tuple[int, int] = (0, 1)
    discover: bool = False  # also serve every agent the verifier knows, with car id = its UUID
    group: str = SHARE_GROUP
    policy_name: str = "{uuid}"  # the car's named runtime policy; keylime names it after the agent by default
    policy_prefixes: tuple[str, ...] = ("/opt/donkey/models/",)  # the only paths cars may add digests for
    policy_digests: Path | None = None  # when set: only digests listed here (sha256sum format) are added
    policy_settle_timeout_s: float = 60.0


def load_config(path: Path) -> BridgeConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BridgeConfigError(f"{path}: {exc}") from None
    bridge, verifier, cars = data.get("bridge", {}), data.get("verifier", {}), data.get("cars", {})
    policies = data.get("policy", {})

    def need(table: Mapping[str, Any], section: str, key: str) -> Any:
        if key not in table:
            raise BridgeConfigError(f"{path}: {section}.{key}: required")
        return table[key]

    def optional_path(table: Mapping[str, Any], key: str) -> Path | None:
        return Path(table[key]) if table.get(key) else None

    index, _, count = str(bridge.get("shard", "0/1")).partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise BridgeConfigError(f"{path}: bridge.shard: expected 'i/N' with 0 <= i < N, got {bridge.get('shard')!r}")
    prefixes = policies.get("prefixes", ["/opt/donkey/models/"])
    if not (isinstance(prefixes, list) and all(isinstance(prefix, str) and prefix.startswith("/")
                                               and prefix.endswith("/") for prefix in prefixes)):
        raise BridgeConfigError(f"{path}: policy.prefixes: expected a list of absolute directories ending in '/'")
    try:
        str(policies.get("name", "{uuid}")).format(car="car", uuid="uuid")
    except (KeyError, IndexError, ValueError) as exc:
        raise BridgeConfigError(f"{path}: policy.name: only {{car}} and {{uuid}} may be used ({exc})") from None
    if not all(isinstance(value, str) for value in cars.values()):
        raise BridgeConfigError(f"{path}: cars: expected car_id = \"<Keylime agent UUID>\" lines")
    return BridgeConfig(
        fleet=need(bridge, "bridge", "fleet"), mqtt_url=need(bridge, "bridge", "mqtt_url"),
        signing_key=Path(need(bridge, "bridge", "signing_key")), verifier_url=need(verifier, "verifier", "url"),
        cars=dict(cars), verifier_ca=optional_path(verifier, "ca"), verifier_cert=optional_path(verifier, "cert"),
        verifier_key=optional_path(verifier, "key"), api_version=str(verifier.get("api_version", "2.5")),
        token_lifetime_s=float(bridge.get("token_lifetime_s", 30.0)),
        poll_interval_s=float(bridge.get("poll_interval_s", 10.0)),
        max_attestation_age_s=float(bridge.get("max_attestation_age_s", 60.0)),
        webhook=str(bridge.get("webhook", "127.0.0.1:8990")), revocation_cert=optional_path(bridge, "revocation_cert"),
        webhook_cert=optional_path(bridge, "webhook_cert"), webhook_key=optional_path(bridge, "webhook_key"),
        webhook_client_ca=optional_path(bridge, "webhook_client_ca"),
        shard=(int(index), int(count)), discover=bool(bridge.get("discover", False)),
        group=str(bridge.get("group", SHARE_GROUP)), policy_name=str(policies.get("name", "{uuid}")),
        policy_prefixes=tuple(str(prefix) for prefix in policies.get("prefixes", ["/opt/donkey/models/"])),
        policy_digests=optional_path(policies, "digests"),
        policy_settle_timeout_s=float(policies.get("settle_timeout_s", 60.0)))


def in_shard(agent_uuid: str, shard: tuple[int, int]) -> bool:
    index, count = shard
    return int.from_bytes(hashlib.sha256(agent_uuid.lower().encode()).digest()[:4], "big") % count == index


def parse_revocation(body: bytes, revocation_public_key: Any = None) -> tuple[dict[str, Any] | None, str]:
    """The verifier's webhook body, ``{"msg": "<JSON string>", "signature": "<base64 or empty>"}``.

    Shape from keylime 7.14.3 ``cloud_verifier_common.prepare_error`` (msg: type, ip, agent_id, port, tpm_policy,
    meta_data, event_time, and event_id, severity_label, context when an event caused it; signature: base64
    RSA-PSS/SHA-256 over the msg bytes by the agent's revocation key, or empty) and
    ``revocation_notifier.WebhookNotificationManager.notify_webhook`` (POSTed as JSON, bytes turned to str).
    Returns (message, "") or (None, why it was refused).
    """
    try:
        envelope = json.loads(body)
        message_text = envelope["msg"]
        message = json.loads(message_text)
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"not a Keylime revocation notification: {exc}"
    if not isinstance(message, dict) or not isinstance(message.get("agent_id"), str):
        return None, "revocation without an agent_id"
    if revocation_public_key is not None:
        import base64
        import binascii

        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        try:
            signature = base64.b64decode(envelope.get("signature") or "", validate=True)
            revocation_public_key.verify(signature, message_text.encode(), padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())
        except (InvalidSignature, binascii.Error, ValueError):
            return None, "bad or missing signature (checked against bridge.revocation_cert)"
    return message, ""


Publish = Callable[[str, bytes, bool, float | None], None]  # topic, payload, retain, message expiry (s) or None


@dataclass
class Bridge:
    """The bridge's decisions, without threads or sockets: time in, tokens out through ``publish``."""

    config: BridgeConfig
    key: tokens.PrivateKey
    verifier: Any  # VerifierClient or a test double with agent(uuid) and agents()
    publish: Publish
    clock: Callable[[], float] = time.time
    revoked_ms: dict[str, int] = field(default_factory=dict)  # uuid -> iat of the newest revoked token seen
    _last_iat: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _policy_locks: dict[str, threading.Lock] = field(default_factory=dict)
    sleep: Callable[[float], None] = time.sleep

    def _now_ms(self) -> int:
        # Strictly increasing per instance: iat is the cars' replay counter.
        with self._lock:
            self._last_iat = max(self._last_iat + 1, round(self.clock() * 1000))
            return self._last_iat

    def cars(self, statuses: Mapping[str, Any] | None = None) -> dict[str, str]:
        cars = dict(self.config.cars)
        if self.config.discover and statuses:
            known = {uuid.lower() for uuid in cars.values()}
            cars.update({uuid: uuid for uuid in statuses if uuid.lower() not in known})
        return {car: uuid for car, uuid in cars.items() if in_shard(uuid, self.config.shard)}

    def issue(self, car: str, agent_uuid: str, status: str, reason: str) -> tokens.Claims:
        now = self._now_ms()
        lifetime = REVOKED_LIFETIME_MS if status == "revoked" else round(self.config.token_lifetime_s * 1000)
        claims = tokens.Claims(fleet=self.config.fleet, car=car, uuid=agent_uuid, status=status, iat=now,
                               exp=now + lifetime, release=None, reason=reason[:200])
        expiry = None if status == "revoked" else self.config.token_lifetime_s
        self.publish(attestation_topic(self.config.fleet, car), tokens.sign(claims, self.key), True, expiry)
        return claims

    def decide(self, car: str, agent_uuid: str, results: dict[str, Any] | None) -> tokens.Claims:
        mapped = map_status(results, self.clock(), self.config.max_attestation_age_s)
        revoked = self.revoked_ms.get(agent_uuid.lower())
        if revoked is not None:
            if mapped.status == "pass" and (mapped.last_success_s or 0) * 1000 <= revoked:
                return self.issue(car, agent_uuid, "revoked", "revoked; no successful attestation since")
            if mapped.status == "pass":
                self.revoked_ms.pop(agent_uuid.lower(), None)
        return self.issue(car, agent_uuid, mapped.status, mapped.reason)

    def poll_once(self) -> list[tokens.Claims]:
        """One round: every served car's status from the verifier (one bulk request), one token each."""
        try:
            statuses = {uuid.lower(): status for uuid, status in self.verifier.agents().items()}
        except VerifierError as exc:
            log.error("verifier unreachable, no tokens this round (the cars' tokens expire): %s", exc)
            return []
        return [self.decide(car, uuid, statuses.get(uuid.lower())) for car, uuid in self.cars(statuses).items()]

    def refresh(self, car: str) -> tokens.Claims | None:
        """A car asked for a fresh token (start-up): ask the verifier about it alone."""
        agent_uuid = self.config.cars.get(car) or (car if self.config.discover else None)
        if agent_uuid is None:
            return None
        try:
            results = self.verifier.agent(agent_uuid)
        except VerifierError as exc:
            log.error("refresh for %s: %s", car, exc)
            return None
        return self.decide(car, agent_uuid, results)

    def revoke(self, message: Mapping[str, Any]) -> list[tokens.Claims]:
        """A revocation notification: a revoked token for the car of ``agent_id``, at once."""
        agent_uuid = str(message["agent_id"]).lower()
        cars = [car for car, uuid in self.config.cars.items() if uuid.lower() == agent_uuid]
        if not cars and self.config.discover:
            cars = [agent_uuid]
        detail = message.get("event_id") or message.get("type") or "revocation"
        issued = [self.issue(car, agent_uuid, "revoked", f"{detail} ({message.get('severity_label', '')})")
                  for car in cars]
        if issued:
            self.revoked_ms[agent_uuid] = max(claims.iat for claims in issued)
        return issued

    def uuid_of(self, car: str) -> str | None:
        return self.config.cars.get(car) or (car if self.config.discover else None)

    def handle_policy(self, car: str, payload: bytes) -> PolicyReady | None:
        """A car's policy request (``donkey/<fleet>/<car>/attestation/policy``): apply it, publish the answer."""
        try:
            request = parse_request(payload)
        except PolicySyncError as exc:
            log.warning("policy request from %s refused: %s", car, exc)
            return None
        ready = self.apply_policy(car, request)
        if not ready.ok:
            log.warning("policy request %s from %s refused: %s", request.request_id, car, ready.error)
        self.publish(ready_topic(self.config.fleet, car), ready.encode(), False, READY_EXPIRY_S)
        return ready

    def _approved(self) -> set[str] | None:
        if self.config.policy_digests is None:
            return None
        lines = self.config.policy_digests.read_text(encoding="utf-8").splitlines()
        return {line.split()[0].lower() for line in lines if line.strip() and not line.startswith("#")}

    def apply_policy(self, car: str, request: PolicyRequest) -> PolicyReady:
        """Merge ``request`` into the car's named runtime policy; the confirmation (or refusal) to publish."""
        def refuse(why: str) -> PolicyReady:
            return PolicyReady(request.request_id, car, request.uuid, False, error=why)

        agent_uuid = self.uuid_of(car)
        if agent_uuid is None or agent_uuid.lower() != request.uuid or request.car != car:
            return refuse(f"car {request.car!r} with agent {request.uuid} is not this bridge's car {car!r}")
        outside = [path for path in request.digests if not path.startswith(self.config.policy_prefixes)
                   or "/../" in path or "/./" in path]
        if outside:
            return refuse(f"{outside[0]}: only paths under {', '.join(self.config.policy_prefixes)} may be added")
        try:
            approved = self._approved()
        except OSError as exc:
            return refuse(f"policy.digests: {exc}")
        if approved is not None:
            unknown = sorted({digest for values in request.digests.values() for digest in values} - approved)
            if unknown:
                return refuse(f"digest {unknown[0]} is not in the fleet's approved list")
        name = self.config.policy_name.format(car=car, uuid=agent_uuid)
        with self._lock:
            lock = self._policy_locks.setdefault(name, threading.Lock())
        with lock:  # one writer per policy in this instance; other instances: re-read and retry below
            try:
                listed = None
                for _ in range(3):
                    current = self.verifier.runtime_policy(name)
                    if current is None:
                        return refuse(f"the verifier has no runtime policy named {name!r}: enrol the car with it")
                    merged, changed = merge(current, request.digests)
                    if changed:
                        self.verifier.put_runtime_policy(name, merged)
                    listed = self.verifier.runtime_policy(name) or {}
                    if all(set(values) <= set(listed.get("digests", {}).get(path, []))
                           for path, values in request.digests.items()):
                        break
                else:
                    return refuse(f"runtime policy {name!r} kept changing under concurrent updates")
                problem = self.settle(agent_uuid)
            except VerifierError as exc:
                return refuse(str(exc))
        if problem:
            return refuse(problem)
        release = listed.get("release")
        return PolicyReady(request.request_id, car, request.uuid, True, name,
                           release if isinstance(release, int) else None,
                           {path: tuple(listed["digests"][path]) for path in request.digests})

    def settle(self, agent_uuid: str) -> str:
        """Wait until the verifier validates this agent's next quote against the policy as it is now; "" or why not.

        keylime 7.14.3 (pull mode) reads the policy once per cycle, in ``process_agent``, and hands that copy to the
        next scheduled ``invoke_get_quote`` (``call_later(quote_interval, invoke_get_quote, agent, mb_policy,
        runtime_policy, ...)``); the attestation count reaches the database only after that read. So a quote
        scheduled before the update is still checked against the old policy: a confirmation sent at once would let
        the car measure the new file into a quote judged by the old policy (``runtime_policy_hash``, terminal). Two
        more successful attestations counted after the update guarantee the read after it. An agent the verifier
        is not attesting has no scheduled quote: its next start reads the policy afresh.
        """
        status = self.verifier.agent(agent_uuid)
        state = status.get("operational_state") if status else None
        if status is None or (state not in ATTESTING and not (state is None and
                                                              status.get("attestation_status") == "PASS")):
            return ""
        start = int(status.get("attestation_count") or 0)
        deadline = self.clock() + self.config.policy_settle_timeout_s
        while self.clock() < deadline:
            self.sleep(0.2)
            status = self.verifier.agent(agent_uuid)
            if status is None or status.get("operational_state") not in ATTESTING | {None}:
                return ""  # no longer attesting: nothing scheduled with the old policy; its token tells the car
            if int(status.get("attestation_count") or 0) >= start + 2:
                return ""
        return (f"the verifier did not attest agent {agent_uuid} twice within "
                f"{self.config.policy_settle_timeout_s:.0f} s of the policy update")

    def observe(self, payload: bytes) -> None:
        """A retained token on the fleet's attestation topics (ours or another instance's): remember revocations."""
        try:
            claims = json.loads(payload)["claims"]
            if claims["status"] == "revoked" and claims["fleet"] == self.config.fleet:
                uuid = str(claims["uuid"]).lower()
                self.revoked_ms[uuid] = max(self.revoked_ms.get(uuid, 0), int(claims["iat"]))
        except (ValueError, KeyError, TypeError):
            return


def webhook_tls(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The webhook's server TLS: the verifier checks it against its trusted_server_ca (``cv_ca/cacert.crt``) and,
    with ``client_ca``, must present its own client certificate (``cv_ca/client-cert.crt``): then nobody else can
    post a revocation."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(client_ca))
    return context


def webhook_server(bridge: Bridge, address: str, revocation_public_key: Any = None,
                   tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, 1 << 20))
            message, problem = parse_revocation(body, revocation_public_key)
            if message is None:
                self._reply(400, problem)
                return
            issued = bridge.revoke(message)
            log.warning("revocation for agent %s: %d revoked token(s) published", message["agent_id"], len(issued))
            self._reply(200, f"revoked {len(issued)}")

        def _reply(self, code: int, text: str) -> None:
            data = json.dumps({"code": code, "status": text}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("webhook: " + format, *args)

    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    return server


def mqtt_client(config: BridgeConfig, bridge_ref: list[Bridge], work: Any = None) -> Any:
    """A paho MQTT 5 client: the shared refresh and policy subscriptions and the fleet's retained tokens.

    Policy requests wait on the verifier (seconds): they run on ``work`` (an executor), never on paho's thread.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.subscribeoptions import SubscribeOptions

    url = urlparse(config.mqtt_url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if url.scheme == "mqtts":
        client.tls_set()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe([(refresh_filter(config.fleet, config.group), SubscribeOptions(qos=1)),
                          (policy_filter(config.fleet, config.group), SubscribeOptions(qos=1)),
                          (f"donkey/{config.fleet}/+/attestation", SubscribeOptions(qos=1, noLocal=True))])

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        parts = message.topic.split("/")
        if parts[-1] == "refresh" and len(parts) == 5:
            bridge_ref[0].refresh(parts[2])
        elif parts[-1] == "policy" and len(parts) == 5 and work is not None:
            work.submit(bridge_ref[0].handle_policy, parts[2], message.payload)
        elif parts[-1] == "attestation":
            bridge_ref[0].observe(message.payload)

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883), keepalive=30)
    return client


def make_publish(client: Any) -> Publish:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def publish(topic: str, payload: bytes, retain: bool, expiry_s: float | None) -> None:
        properties = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            properties.MessageExpiryInterval = max(1, round(expiry_s))
        client.publish(topic, payload, qos=1, retain=retain, properties=properties)

    return publish


def serve(config: BridgeConfig, stop: threading.Event) -> None:
    key = tokens.load_private_key(config.signing_key)
    verifier = VerifierClient(config.verifier_url, ca=config.verifier_ca, cert=config.verifier_cert,
                              key=config.verifier_key, api_version=config.api_version)
    holder: list[Bridge] = []
    from concurrent.futures import ThreadPoolExecutor

    work = ThreadPoolExecutor(max_workers=4, thread_name_prefix="policy")
    client = mqtt_client(config, holder, work)
    bridge = Bridge(config, key, verifier, make_publish(client))
    holder.append(bridge)
    client.loop_start()
    server = None
    if config.webhook:
        public_key = None
        if config.revocation_cert is not None:
            from cryptography import x509

            public_key = x509.load_pem_x509_certificate(config.revocation_cert.read_bytes()).public_key()
        tls = None
        if config.webhook_cert is not None and config.webhook_key is not None:
            tls = webhook_tls(config.webhook_cert, config.webhook_key, config.webhook_client_ca)
        server = webhook_server(bridge, config.webhook, public_key, tls)
        threading.Thread(target=server.serve_forever, name="webhook", daemon=True).start()
    try:
        stop.wait(1.0)  # the retained tokens (revocations) arrive before the first round
        while not stop.is_set():
            bridge.poll_once()
            stop.wait(config.poll_interval_s)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        work.shutdown(wait=False, cancel_futures=True)
        client.loop_stop()
        client.disconnect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="donkey-attest-bridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the bridge's TOML file (docs/attestation.md)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except BridgeConfigError as exc:
        print(f"donkey-attest-bridge: {exc}", file=sys.stderr)
        return 78
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve(config, stop)
    except KeyboardInterrupt:
        stop.set()
    except (tokens.TokenError, OSError) as exc:
        print(f"donkey-attest-bridge: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
