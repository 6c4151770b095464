"""The Keylime verifier, as the fleet bridge sees it: its REST API (admin mTLS) and what its answers mean.

Why stdlib HTTP: the bridge runs beside the verifier with few dependencies; ``urllib`` with an ``ssl`` context
holding the admin client certificate is all the API needs. Responses are Keylime's envelope
``{"code", "status", "results"}`` (``keylime/web_util.py`` ``echo_json_response``):

- ``GET /v{api}/agents/{uuid}``: one agent's status (``cloud_verifier_common.process_get_status``; example in
  keylime ``docs/rest_apis/2_5/verifier.rst``); 404 when the verifier does not know the agent.
- ``GET /v{api}/agents/?bulk=1``: ``{uuid: status, ...}`` for every agent
  (``cloud_verifier_tornado.AgentsHandler.get``).
- ``GET /v{api}/agents/``: ``{"uuids": [[uuid], ...]}`` (rows of one column).
- ``GET/PUT/POST /v{api}/allowlists/{name}``: a named runtime policy (``AllowlistHandler``); PUT and POST take
  ``{"runtime_policy": base64(JSON), "runtime_policy_key": ""}`` and answer 201; PUT of an unknown name is 404.

``map_status`` turns one status into a token status; the rules are in docs/attestation.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.errors import AgentError

# keylime/common/states.py
REGISTERED, START, SAVED, GET_QUOTE, GET_QUOTE_RETRY, PROVIDE_V, PROVIDE_V_RETRY = 0, 1, 2, 3, 4, 5, 6
FAILED, TERMINATED, INVALID_QUOTE, TENANT_FAILED = 7, 8, 9, 10
STATE_NAMES = {0: "REGISTERED", 1: "START", 2: "SAVED", 3: "GET_QUOTE", 4: "GET_QUOTE_RETRY", 5: "PROVIDE_V",
               6: "PROVIDE_V_RETRY", 7: "FAILED", 8: "TERMINATED", 9: "INVALID_QUOTE", 10: "TENANT_FAILED"}
ATTESTING = frozenset({GET_QUOTE, GET_QUOTE_RETRY, PROVIDE_V, PROVIDE_V_RETRY})
FAILING = frozenset({FAILED, INVALID_QUOTE, TENANT_FAILED})


class VerifierError(AgentError, RuntimeError):
    """The verifier could not be asked (network, TLS, authorisation, an unexpected answer)."""


@dataclass(frozen=True)
class Mapped:
    status: str  # a token status: pass, fail, pending, timeout, unknown
    reason: str
    last_success_s: int | None = None  # the verifier's last_successful_attestation (epoch s)


def map_status(results: dict[str, Any] | None, now_s: float, max_age_s: float) -> Mapped:
    """One verifier status (the ``results`` of GET agents/{uuid}; None when it answered 404) as a token status.

    ``pass`` only while the verifier is attesting the agent (pull: operational_state 3-6; push: attestation_status
    PASS) *and* its last successful attestation is at most ``max_age_s`` old: a verifier that stopped polling,
    or an agent that stopped answering, must not keep a car driving.
    """
    if results is None:
        return Mapped("unknown", "the verifier does not know this agent (not enrolled, or deleted)")
    state = results.get("operational_state")
    status = results.get("attestation_status")
    last = results.get("last_successful_attestation")
    last_s = last if isinstance(last, int) and not isinstance(last, bool) else None
    event = results.get("last_event_id")
    suffix = f", last event {event}" if event else ""
    if isinstance(state, int) and not isinstance(state, bool):
        name = f"operational_state {state} {STATE_NAMES.get(state, '?')}"
        if state in FAILING:
            return Mapped("fail", f"{name}{suffix}", last_s)
        if state not in ATTESTING:
            return Mapped("pending", name, last_s)
    elif state is None and status in ("FAIL", "TIMEOUT", "PENDING"):  # push mode: no operational_state
        return Mapped({"FAIL": "fail", "TIMEOUT": "timeout", "PENDING": "pending"}[status],
                      f"attestation_status {status}{suffix}", last_s)
    elif state is not None or status != "PASS":
        return Mapped("unknown", f"unexpected status: operational_state {state!r}, attestation_status {status!r}")
    else:
        name = "attestation_status PASS (push)"
    count = results.get("attestation_count")
    if not last_s or (isinstance(count, int) and count == 0):
        return Mapped("pending", f"{name}, no successful attestation yet", last_s)
    age = now_s - last_s
    if age > max_age_s:
        return Mapped("timeout", f"{name}, last successful attestation {age:.0f} s ago (> {max_age_s:.0f} s)", last_s)
    return Mapped("pass", f"{name}, attested {max(age, 0):.0f} s ago", last_s)


class VerifierClient:
    """GETs against the verifier with the admin mTLS identity (cv_ca/client-cert.crt, client-private.pem)."""

    def __init__(self, url: str, *, ca: Path | None, cert: Path | None, key: Path | None, api_version: str = "2.5",
                 timeout_s: float = 5.0) -> None:
        self.base = f"{url.rstrip('/')}/v{api_version}"
        self.timeout_s = timeout_s
        self.context: ssl.SSLContext | None = None
        if url.startswith("https://"):
            self.context = ssl.create_default_context(cafile=str(ca) if ca else None)
            self.context.check_hostname = False  # Keylime's generated server certificate names no host we know
            if cert and key:
                self.context.load_cert_chain(str(cert), str(key))

    def _get(self, path: str) -> tuple[int, dict[str, Any]]:
        return self._request("GET", path)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{self.base}/{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as response:
                code, body_bytes = response.status, response.read()
        except urllib.error.HTTPError as exc:
            code, body_bytes = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise VerifierError(f"{method} {self.base}/{path}: {getattr(exc, 'reason', exc)}") from None
        try:
            envelope = json.loads(body_bytes) if body_bytes else {}
        except ValueError:
            raise VerifierError(f"{method} {self.base}/{path}: HTTP {code}, not JSON") from None
        if not isinstance(envelope, dict):
            raise VerifierError(f"{method} {self.base}/{path}: HTTP {code}, unexpected body")
        return code, envelope

    def agent(self, agent_uuid: str) -> dict[str, Any] | None:
        """One agent's status, or None when the verifier does not know it (404)."""
        code, envelope = self._get(f"agents/{agent_uuid}")
        if code == 404:
            return None
        if code != 200 or not isinstance(envelope.get("results"), dict):
            raise VerifierError(f"GET agents/{agent_uuid}: HTTP {code} {envelope.get('status', '')}")
        return envelope["results"]

    def agents(self) -> dict[str, dict[str, Any]]:
        """Every agent's status in one request (``?bulk=1``)."""
        code, envelope = self._get("agents/?bulk=1")
        results = envelope.get("results")
        if code != 200 or not isinstance(results, dict):
            raise VerifierError(f"GET agents/?bulk=1: HTTP {code} {envelope.get('status', '')}")
        return {uuid: status for uuid, status in results.items() if isinstance(status, dict)}

    def runtime_policy(self, name: str) -> dict[str, Any] | None:
        """The named runtime policy (``GET /allowlists/{name}``), or None when there is none by that name.

        keylime 7.14.3 returns ``runtime_policy`` as the stored JSON text (its docs say base64; reference §8);
        both are accepted.
        """
        code, envelope = self._get(f"allowlists/{quote(name, safe='')}")
        if code == 404:
            return None
        results = envelope.get("results")
        if code != 200 or not isinstance(results, dict):
            raise VerifierError(f"GET allowlists/{name}: HTTP {code} {envelope.get('status', '')}")
        text = results.get("runtime_policy")
        if not text:
            return None  # keylime stores the empty policy "{}" as null
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = json.loads(base64.b64decode(text, validate=True))
            except (ValueError, binascii.Error):
                raise VerifierError(f"GET allowlists/{name}: runtime_policy is neither JSON nor base64 JSON") from None
        if not isinstance(value, dict):
            raise VerifierError(f"GET allowlists/{name}: runtime_policy is not a JSON object")
        return value

    def put_runtime_policy(self, name: str, runtime_policy: dict[str, Any], *, create: bool = False) -> None:
        """Replace (``PUT``) or create (``POST``) the named runtime policy; the verifier validates its schema."""
        encoded = base64.b64encode(json.dumps(runtime_policy).encode()).decode()
        body = {"runtime_policy": encoded, "runtime_policy_key": ""}
        method = "POST" if create else "PUT"
        code, envelope = self._request(method, f"allowlists/{quote(name, safe='')}", body)
        if code not in (200, 201):
            raise VerifierError(f"{method} allowlists/{name}: HTTP {code} {envelope.get('status', '')}")
