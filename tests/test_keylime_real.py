"""The bridge against a real Keylime 7.14.3 verifier and registrar, with swtpm playing the car's TPM.

Per module: ``keylime_verifier`` and ``keylime_registrar`` run as processes (the venv's console scripts) with a
temporary ``KEYLIME_DIR``, their own config files (``KEYLIME_{VERIFIER,REGISTRAR,CA,LOGGING}_CONFIG``, read by
``keylime/config.py`` instead of /etc/keylime), sqlite, and TLS material the verifier generates itself
(``tls_dir = generate``: keylime's ``ca_util`` writes ``cv_ca/``). The verifier's revocation notifier posts to the
bridge's webhook (``[revocations] enabled_revocation_notifications = ['webhook']``).

The car's side is played by the test (reference §1.2, §12): a fresh swtpm per agent, EK and AK from tpm2-tools,
registration with the registrar (register, TPM2_ActivateCredential, the HMAC auth tag), and the agent's HTTPS API
as the verifier polls it in pull mode: ``GET /v2.x/quotes/integrity`` answered with a real ``tpm2_quote`` over PCR
10 (extended on the swtpm for every line of the IMA log the test serves) and PCR 16 (the agent's public key, as
rust-keylime binds it), with mTLS (the verifier's client certificate must chain to its CA).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.attest import imalog
from agent.attest import policy as policies
from agent.attest.bridge import Bridge, BridgeConfig, serve, webhook_server, webhook_tls
from agent.attest.policy_sync import PolicySync, parse_ready
from agent.attest.verifier import VerifierClient
from tests import mosquitto
from tests.keylime_inproc import DEBIAN_GPG, LOGGING_CONF
from tests.mosquitto import free_port

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
TOOLS = ("swtpm", "tpm2_createek", "tpm2_createak", "tpm2_quote", "tpm2_pcrextend", "tpm2_activatecredential",
         "tpm2_startauthsession", "tpm2_policysecret", "tpm2_flushcontext")
FLEET = "lab"
MODEL = "/opt/donkey/models/pilot.tflite"


def _missing() -> str:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian swtpm, swtpm-tools, tpm2-tools)"
    if not (VENV_BIN / "keylime_verifier").exists():
        return "keylime_verifier is not installed (the test extra pins keylime==7.14.3)"
    if not DEBIAN_GPG.is_dir():
        return "Debian's python3-gpg is not installed (keylime/signing.py imports gpg)"
    return ""


if _missing():
    pytest.skip(_missing(), allow_module_level=True)


# The services.

COMMON = """
authorization_provider = simple
database_url = sqlite
database_pool_sz_ovfl = 5,10
auto_migrate_db = True
durable_attestation_import =
persistent_store_url =
transparency_log_url =
time_stamp_authority_url =
time_stamp_authority_certs_path =
persistent_store_format = json
persistent_store_encoding =
transparency_log_sign_algo = sha256
server_key = default
server_key_password =
server_cert = default
trusted_client_ca = default
"""


def _verifier_conf(port: int, registrar_tls_port: int, webhook_port: int, zmq_port: int) -> str:
    return f"""[verifier]
version = 2.6
uuid = default
ip = 127.0.0.1
port = {port}
registrar_ip = 127.0.0.1
registrar_port = {registrar_tls_port}
enable_agent_mtls = True
tls_dir = generate
cert_subject_alternative_names =
client_key = default
client_key_password =
client_cert = default
trusted_server_ca = default
{COMMON}
num_workers = 1
exponential_backoff = False
retry_interval = 0.3
max_retries = 3
quote_interval = 0.5
max_upload_size = 104857600
request_timeout = 3
measured_boot_policy_name = accept-all
measured_boot_imports = []
measured_boot_evaluate = once
severity_labels = ["info", "notice", "warning", "error", "critical", "alert", "emergency"]
severity_policy = [{{"event_id": ".*", "severity_label": "emergency"}}]
ignore_tomtou_errors = False
signed_attributes =
require_allow_list_signatures = False
mode = pull
challenge_lifetime = 1800
verification_timeout = 0
session_lifetime = 180
extend_token_on_attestation = True
shutdown_drain_timeout = 1

[revocations]
enabled_revocation_notifications = ['webhook']
webhook_url = http://127.0.0.1:{webhook_port}/
zmq_ip = 127.0.0.1
zmq_port = {zmq_port}
"""


def _registrar_conf(port: int, tls_port: int) -> str:
    return f"""[registrar]
version = 2.6
ip = 127.0.0.1
port = {port}
tls_port = {tls_port}
tls_dir = default
{COMMON}
signed_attributes = ek_tpm,aik_tpm,ekcert
tpm_identity = default
malformed_cert_action = warn
"""


CA_CONF = """[ca]
version = 2.6
password = default
cert_country = US
cert_ca_name = Keylime Test CA
cert_state = MA
cert_locality = Lexington
cert_organization = donkey-edge-agent tests
cert_org_unit = 53
cert_ca_lifetime = 3650
cert_lifetime = 365
cert_bits = 2048
cert_crl_dist = http://localhost:38080/crl
"""


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {seconds} s: {log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """The services fork workers: stop the whole process group (started with start_new_session)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(8)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    except ProcessLookupError:
        pass


class Keylime:
    """A verifier and a registrar, started verifier first (it generates cv_ca/, the registrar reuses it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.work = directory / "work"
        self.work.mkdir()
        shim = directory / "gpg-shim"  # only python3-gpg from Debian's dist-packages, nothing else
        shim.mkdir()
        (shim / "gpg").symlink_to(DEBIAN_GPG)
        self.port, self.registrar_port, self.registrar_tls_port = free_port(), free_port(), free_port()
        self.webhook_port = free_port()
        files = {"verifier": _verifier_conf(self.port, self.registrar_tls_port, self.webhook_port, free_port()),
                 "registrar": _registrar_conf(self.registrar_port, self.registrar_tls_port), "ca": CA_CONF}
        self.env = {**os.environ, "KEYLIME_DIR": str(self.work), "PYTHONPATH": str(shim),
                    "KEYLIME_LOGGING_CONFIG": str(directory / "logging.conf")}
        (directory / "logging.conf").write_text(LOGGING_CONF.read_text().replace("level = WARNING", "level = INFO"))
        for name, text in files.items():
            (directory / f"{name}.conf").write_text(text)
            self.env[f"KEYLIME_{name.upper()}_CONFIG"] = str(directory / f"{name}.conf")
        self.processes: list[subprocess.Popen[bytes]] = []

    def _start(self, name: str, port: int) -> None:
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen([str(VENV_BIN / f"keylime_{name}")], env=self.env, cwd=self.work,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        _wait_port(port, process, log)

    def start(self) -> Keylime:
        self._start("verifier", self.port)
        self._start("registrar", self.registrar_tls_port)
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):
            _stop(process)

    @property
    def ca(self) -> Path:
        return self.work / "cv_ca"

    def admin_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca / "cacert.crt"))
        context.check_hostname = False
        context.load_cert_chain(str(self.ca / "client-cert.crt"), str(self.ca / "client-private.pem"))
        return context

    def client(self) -> VerifierClient:
        return VerifierClient(f"https://127.0.0.1:{self.port}", ca=self.ca / "cacert.crt",
                              cert=self.ca / "client-cert.crt", key=self.ca / "client-private.pem")

    def request(self, method: str, url: str, body: dict[str, Any] | None = None,
                context: ssl.SSLContext | None = None) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def verifier(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        return self.request(method, f"https://127.0.0.1:{self.port}/v2.5/{path}", body, self.admin_context())

    def registrar(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                  tls: bool = False) -> tuple[int, dict[str, Any]]:
        if tls:
            return self.request(method, f"https://127.0.0.1:{self.registrar_tls_port}/v2.5/{path}", body,
                                self.admin_context())
        return self.request(method, f"http://127.0.0.1:{self.registrar_port}/v2.5/{path}", body)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def webhook(self, bridge: Bridge) -> ThreadingHTTPServer:
        """The bridge's webhook where the verifier posts: HTTPS with a certificate from the verifier's CA (here
        the verifier's own server certificate; a fleet issues the bridge its own with ``keylime_ca -c mkcert``),
        and the verifier's client certificate required."""
        tls = webhook_tls(self.ca / "server-cert.crt", self.ca / "server-private.pem", self.ca / "cacert.crt")
        server = webhook_server(bridge, f"127.0.0.1:{self.webhook_port}", tls=tls)
        threading.Thread(target=server.serve_forever, name="webhook", daemon=True).start()
        return server

    def grep(self, name: str, *words: str) -> str:
        """The service's log lines naming any of ``words`` (for failure messages)."""
        return "\n".join(line for line in self.log(name).splitlines() if any(word in line for word in words))


# The car's side: swtpm, tpm2-tools and the agent's HTTPS API.

def self_signed(common_name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class EmulatedAgent:
    """One car: a fresh swtpm (PCR 10 cannot be reset), its EK and AK, an IMA log and the agent's HTTPS API."""

    def __init__(self, directory: Path, uuid: str, verifier_ca: Path) -> None:
        self.directory = directory
        self.uuid = uuid
        directory.mkdir(parents=True)
        (directory / "state").mkdir()
        self.swtpm, port = self._start_swtpm()
        self.env = {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:host=127.0.0.1,port={port}"}
        self.lock = threading.Lock()  # one TPM command sequence at a time (3 transient slots, no resource manager)
        try:
            self.tpm("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
        except RuntimeError:
            self.swtpm.kill()
            self.swtpm.wait(5)
            raise
        self.tpm("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256", "-s", "rsassa",
                 "-u", "ak.pub", "-n", "ak.name")
        self.ek_tpm = (directory / "ek.pub").read_bytes()
        self.ak_tpm = (directory / "ak.pub").read_bytes()
        # The agent's payload key; rust-keylime extends PCR 16 with it and the verifier checks that (TPM_DATA_PCR).
        self.pubkey = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.tpm("tpm2_pcrextend", f"16:sha256={hashlib.sha256(self.pubkey.encode()).hexdigest()}")
        self.entries: list[imalog.Entry] = []
        self.measure(imalog.boot_aggregate())
        self.cert, key = self_signed(uuid)
        (directory / "agent.crt").write_bytes(self.cert)
        (directory / "agent.key").write_bytes(key)
        self.quotes = 0
        self.answering = True
        self.server = self._serve(verifier_ca)
        self.port = self.server.server_address[1]

    def _start_swtpm(self) -> tuple[subprocess.Popen[bytes], int]:
        """swtpm on a free port pair: the swtpm TCTI finds the control channel at port + 1."""
        for _ in range(5):
            port = free_port()
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            process = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.directory / 'state'}",
                 "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 5
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port + 1), timeout=0.2).close()
                    return process, port
                except OSError:
                    time.sleep(0.02)
            process.kill()
            process.wait(5)
        raise RuntimeError("swtpm did not start on a free port pair")

    def tpm(self, *command: str) -> bytes:
        with self.lock:
            result = subprocess.run(command, cwd=self.directory, env=self.env, capture_output=True, timeout=30)
            subprocess.run(["tpm2_flushcontext", "-t"], cwd=self.directory, env=self.env, capture_output=True,
                           timeout=30)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)}: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def measure(self, entry: imalog.Entry) -> None:
        """What the kernel does when a measured file is opened: a log line, and PCR 10 extended on the TPM."""
        with self.lock:
            self.entries.append(entry)
        self.tpm("tpm2_pcrextend", f"10:sha256={hashlib.sha256(entry.data()).hexdigest()}")

    def open_file(self, path: str, content: bytes) -> str:
        self.measure(imalog.entry(hashlib.sha256(content).digest(), path))
        return hashlib.sha256(content).hexdigest()

    def quote(self, nonce: str, mask: str) -> str:
        pcrs = ",".join(str(index) for index in range(24) if int(mask, 16) >> index & 1)
        self.tpm("tpm2_quote", "-c", "ak.ctx", "-l", f"sha256:{pcrs}", "-q", nonce.encode().hex(), "-m", "q.msg",
                 "-s", "q.sig", "-o", "q.pcrs", "-g", "sha256")
        parts = [base64.b64encode((self.directory / name).read_bytes()).decode() for name in ("q.msg", "q.sig",
                                                                                              "q.pcrs")]
        return "r" + ":".join(parts)

    def _serve(self, verifier_ca: Path) -> ThreadingHTTPServer:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {key: values[0] for key, values in parse_qs(url.query).items()}
                if not agent.answering:
                    self._reply(500, "not answering", {})  # 408, 500, 599: the verifier retries
                    return
                if url.path.endswith("/quotes/integrity"):
                    with agent.lock:
                        log = "".join(entry.line() + "\n" for entry in agent.entries)
                    quote = agent.quote(query["nonce"], query["mask"])
                    results = {"quote": quote, "hash_alg": "sha256", "enc_alg": "rsa", "sign_alg": "rsassa",
                               "ima_measurement_list": log, "ima_measurement_list_entry": 0,
                               "mb_measurement_list": None, "boottime": 1}
                    if query.get("partial") == "0":
                        results["pubkey"] = agent.pubkey
                    agent.quotes += 1
                    self._reply(200, "Success", results)
                else:
                    self._reply(404, "not found", {})

            def _reply(self, code: int, status: str, results: dict[str, Any]) -> None:
                data = json.dumps({"code": code, "status": status, "results": results}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.directory / "agent.crt"), str(self.directory / "agent.key"))
        context.verify_mode = ssl.CERT_REQUIRED  # rust-keylime: the client must chain to trusted_client_ca
        context.load_verify_locations(str(verifier_ca / "cacert.crt"))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, name=f"agent-{self.uuid[-4:]}", daemon=True).start()
        return server

    def activate(self, blob_b64: str) -> str:
        """TPM2_ActivateCredential on the registrar's challenge (EK policy: PolicySecret(endorsement))."""
        (self.directory / "cred.blob").write_bytes(base64.b64decode(blob_b64))
        with self.lock:
            steps = [["tpm2_startauthsession", "--policy-session", "-S", "session.ctx"],
                     ["tpm2_policysecret", "-S", "session.ctx", "-c", "e"],
                     ["tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek.ctx", "-i", "cred.blob", "-o", "secret",
                      "-P", "session:session.ctx"],
                     ["tpm2_flushcontext", "session.ctx"], ["tpm2_flushcontext", "-t"]]
            for step in steps:
                result = subprocess.run(step, cwd=self.directory, env=self.env, capture_output=True, timeout=30)
                if result.returncode:
                    raise RuntimeError(f"{' '.join(step)}: {result.stderr.decode(errors='replace')}")
        secret = (self.directory / "secret").read_bytes()
        # keylime tpm_main.encrypt_aik_with_ek keeps base64(secret) as the HMAC key; crypto.do_hmac is SHA-384.
        return hmac.new(base64.b64encode(secret), self.uuid.encode(), hashlib.sha384).hexdigest()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.swtpm.kill()  # swtpm ignores SIGTERM while a client is connected (reference §12)
        self.swtpm.wait(5)


def enrollment(agent: EmulatedAgent, port: int, runtime_policy: dict[str, Any] | None,
               policy_name: str = "") -> dict[str, Any]:
    """The body keylime_tenant POSTs to the verifier (tenant.py do_cv), for a pull-mode agent."""
    return {
        "v": None, "cloudagent_ip": "127.0.0.1", "cloudagent_port": port, "verifier_ip": "127.0.0.1",
        "tpm_policy": json.dumps({"mask": "0x10400"}),  # PCR 10 (IMA) and 16 (the agent's key)
        "runtime_policy": base64.b64encode(json.dumps(runtime_policy).encode()).decode() if runtime_policy else "",
        "runtime_policy_name": policy_name, "runtime_policy_key": "", "mb_policy": None, "mb_policy_name": "",
        "ima_sign_verification_keys": "", "metadata": json.dumps({}), "revocation_key": "",
        "accept_tpm_hash_algs": ["sha256"], "accept_tpm_encryption_algs": ["rsa", "ecc"],
        "accept_tpm_signing_algs": ["rsassa", "ecschnorr"], "ak_tpm": base64.b64encode(agent.ak_tpm).decode(),
        "mtls_cert": agent.cert.decode(), "supported_version": "2.5",
    }


# Fixtures.

@pytest.fixture(scope="module")
def keylime():
    directory = Path(tempfile.mkdtemp(prefix="keylime-real-"))
    services = Keylime(directory)
    try:
        services.start()
    except RuntimeError as exc:
        services.stop()
        pytest.fail(f"keylime services did not start: {exc}")
    yield services
    services.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_agent(keylime, tmp_path):
    made: list[EmulatedAgent] = []

    def make(uuid: str) -> EmulatedAgent:
        agent = EmulatedAgent(tmp_path / uuid, uuid, keylime.ca)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        keylime.verifier("DELETE", f"agents/{agent.uuid}")
        agent.close()


def uuid_for(index: int) -> str:
    return f"d432fbb3-d2f1-4a97-9ef7-{os.getpid() % 100000:05d}{index:07d}"


class Published:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool, float | None]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, retain: bool, expiry: float | None) -> None:
        with self.lock:
            self.messages.append((topic, payload, retain, expiry))

    def statuses(self, car: str) -> list[str]:
        with self.lock:
            return [json.loads(payload)["claims"]["status"] for topic, payload, *_ in self.messages
                    if topic == f"donkey/{FLEET}/{car}/attestation"]


def make_bridge(keylime: Keylime, cars: dict[str, str], **settings: Any) -> tuple[Bridge, Published, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    published = Published()
    config = BridgeConfig(fleet=FLEET, mqtt_url="mqtt://unused", signing_key=Path("unused"),
                          verifier_url=f"https://127.0.0.1:{keylime.port}", cars=cars, **settings)
    return Bridge(config, key, keylime.client(), published), published, key


def wait_for(predicate: Callable[[], Any], seconds: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not within {seconds} s: {what}")


def poll_states(bridge: Bridge, uuid: str, until: Callable[[dict[str, Any] | None], bool], seconds: float,
                ) -> list[tuple[int | None, str]]:
    """Poll as the bridge does (one bulk GET, map, token) until ``until(status)``; the (state, token) seen."""
    seen: list[tuple[int | None, str]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        statuses = bridge.verifier.agents()
        status = statuses.get(uuid)
        claims = bridge.poll_once()
        state = status.get("operational_state") if status else None
        token = claims[0].status if claims else "none"
        if not seen or seen[-1] != (state, token):
            seen.append((state, token))
        if until(status):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds} s; seen {seen}")


# Tests.

def test_admin_identity_is_required_and_unknown_agents_are_unknown(keylime):
    code, body = keylime.request("GET", f"https://127.0.0.1:{keylime.port}/v2.5/agents/{uuid_for(0)}",
                                 context=_anonymous_context(keylime))
    assert code in (401, 403), body  # no client certificate: not an admin (authorization/providers/simple.py)
    bridge, _, _ = make_bridge(keylime, {"car0": uuid_for(0)})
    assert bridge.verifier.agent(uuid_for(0)) is None  # 404
    claims, = bridge.poll_once()
    assert claims.status == "unknown" and "does not know" in claims.reason


def _anonymous_context(keylime: Keylime) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(keylime.ca / "cacert.crt"))
    context.check_hostname = False
    return context


def test_registration_and_activation_of_an_emulated_tpm(keylime, make_agent):
    """Reference §1.2: register (EK, AK, mTLS cert) -> MakeCredential blob -> ActivateCredential -> HMAC tag."""
    agent = make_agent(uuid_for(1))
    body = {"ek_tpm": base64.b64encode(agent.ek_tpm).decode(), "aik_tpm": base64.b64encode(agent.ak_tpm).decode(),
            "ip": "127.0.0.1", "port": agent.port, "mtls_cert": agent.cert.decode()}
    code, answer = keylime.registrar("POST", f"agents/{agent.uuid}", body)
    assert code == 200, answer
    blob = base64.b64decode(answer["results"]["blob"])
    assert blob[:4] == bytes.fromhex("badcc0de")  # tpm2-tools' credential file magic
    code, answer = keylime.registrar("GET", f"agents/{agent.uuid}", tls=True)
    assert code == 404, answer  # not active yet
    assert keylime.registrar("GET", f"agents/{agent.uuid}")[0] in (400, 401, 403, 404)  # admin reads need TLS
    code, answer = keylime.registrar("PUT", f"agents/{agent.uuid}",
                                     {"auth_tag": agent.activate(base64.b64encode(blob).decode())})
    assert code == 200, answer
    code, answer = keylime.registrar("GET", f"agents/{agent.uuid}", tls=True)
    assert code == 200, answer
    assert base64.b64decode(answer["results"]["aik_tpm"]) == agent.ak_tpm
    assert base64.b64decode(answer["results"]["ek_tpm"]) == agent.ek_tpm

    # The same UUID from another TPM is refused; a wrong tag deletes the registration.
    other = make_agent(uuid_for(2))
    code, _ = keylime.registrar("POST", f"agents/{agent.uuid}", {**body, "ek_tpm": base64.b64encode(
        other.ek_tpm).decode(), "aik_tpm": base64.b64encode(other.ak_tpm).decode()})
    assert code == 403
    code, answer = keylime.registrar("POST", f"agents/{other.uuid}", {**body, "ek_tpm": base64.b64encode(
        other.ek_tpm).decode(), "aik_tpm": base64.b64encode(other.ak_tpm).decode()})
    assert code == 200
    assert keylime.registrar("PUT", f"agents/{other.uuid}", {"auth_tag": "0" * 96})[0] == 400
    assert keylime.registrar("GET", f"agents/{other.uuid}", tls=True)[0] == 404


def test_unreachable_agent_pending_then_failed(keylime, make_agent):
    """Enrolled, but nothing answers at its address: the verifier retries, then FAILED; never a pass."""
    agent = make_agent(uuid_for(3))
    code, answer = keylime.verifier("POST", f"agents/{agent.uuid}", enrollment(agent, free_port(), None))
    assert code == 200, answer
    bridge, _, _ = make_bridge(keylime, {"car3": agent.uuid}, max_attestation_age_s=5)
    seen = poll_states(bridge, agent.uuid, lambda status: status and status["operational_state"] == 7, 20)
    assert all(token in ("pending", "fail") for _, token in seen), seen
    assert seen[0][1] == "pending" and seen[-1] == (7, "fail"), seen
    print(f"unreachable agent: (operational_state, token) seen {seen}")
    status = bridge.verifier.agent(agent.uuid)
    assert status["attestation_count"] == 0 and status["attestation_status"] == "FAIL"
    assert status["last_event_id"] == "internal.verifier.not_reachable"
    assert bridge.poll_once()[0].reason.startswith("operational_state 7 FAILED")


def attested_agent(keylime: Keylime, make_agent: Callable[[str], EmulatedAgent], index: int,
                   model: bytes) -> tuple[EmulatedAgent, dict[str, Any]]:
    """An agent whose log has boot_aggregate and the model, enrolled with a policy listing both."""
    agent = make_agent(uuid_for(index))
    digest = agent.open_file(MODEL, model)
    runtime_policy = policies.build([], release=1)
    runtime_policy["digests"] = {"boot_aggregate": ["0" * 64], MODEL: [digest]}
    code, answer = keylime.verifier("POST", f"agents/{agent.uuid}", enrollment(agent, agent.port, runtime_policy))
    assert code == 200, answer
    return agent, runtime_policy


def test_attested_agent_passes_then_fails_and_is_revoked_when_it_stops_answering(keylime, make_agent):
    agent, _ = attested_agent(keylime, make_agent, 4, b"model one")
    bridge, published, _key = make_bridge(keylime, {"car4": agent.uuid}, max_attestation_age_s=2)
    server = keylime.webhook(bridge)
    try:
        seen = poll_states(bridge, agent.uuid, lambda status: status and status["attestation_count"] >= 2, 20)
        assert seen[-1] == (3, "pass"), seen  # GET_QUOTE, attested with real swtpm quotes over PCR 10 and 16
        assert all(token in ("pending", "pass") for _, token in seen), seen
        assert agent.quotes >= 2
        # The agent stops answering (HTTP 500: the verifier retries, then FAILED): the pass ages into a timeout,
        # and as the agent had attested before, the verifier's own webhook sends comm_error: revoked at once.
        agent.answering = False
        seen = poll_states(bridge, agent.uuid, lambda status: status and status["operational_state"] == 7, 20)
        assert seen[-1][0] == 7
        wait_for(lambda: "revoked" in published.statuses("car4"), 10,
                 "the verifier's webhook: " + keylime.grep("verifier", "notif", "webhook", "revocation"))
        revoked = json.loads(next(payload for topic, payload, *_ in published.messages
                              if json.loads(payload)["claims"]["status"] == "revoked"))
        assert revoked["claims"]["reason"].startswith("internal.verifier.not_reachable")
        bridge.poll_once()
        assert published.statuses("car4")[-1] in ("revoked", "fail")
    finally:
        server.shutdown()
        server.server_close()


def test_policy_first_then_measurement_passes_the_other_order_fails_and_the_webhook_revokes(keylime, make_agent):
    """Reference §8 against the real verifier, with the bridge applying the car's request and the car waiting."""
    agent, _ = attested_agent(keylime, make_agent, 5, b"model one")
    bridge, published, _ = make_bridge(keylime, {"car5": agent.uuid}, max_attestation_age_s=5,
                                       policy_name="{uuid}")  # keylime names the policy after the agent
    server = keylime.webhook(bridge)
    try:
        poll_states(bridge, agent.uuid, lambda status: status and status["attestation_count"] >= 1, 20)
        # The car: a new model, its digest requested before the file is opened.
        sent: list[tuple[str, bytes]] = []
        sync = PolicySync(fleet=FLEET, car="car5", uuid=agent.uuid, publish=lambda t, p: sent.append((t, p)))
        new_model = b"model two"
        new_digest = hashlib.sha256(new_model).hexdigest()
        request_id = sync.request({MODEL: [new_digest]})
        (topic, payload), = sent
        assert topic == f"donkey/{FLEET}/car5/attestation/policy"
        started = time.monotonic()
        ready = bridge.handle_policy("car5", payload)  # what the bridge's shared subscription hands it
        settle_s = time.monotonic() - started
        assert ready is not None and ready.ok, ready
        ready_topic, ready_payload, retain, _ = published.messages[-1]
        assert ready_topic == f"donkey/{FLEET}/car5/attestation/policy/ready" and not retain
        sync.on_ready(ready_payload)
        assert sync.ready(request_id)
        confirmed = parse_ready(ready_payload)
        assert confirmed.release == 2 and set(confirmed.digests[MODEL]) == {
            hashlib.sha256(b"model one").hexdigest(), new_digest}  # union: the old digest stays
        stored = bridge.verifier.runtime_policy(agent.uuid)
        assert stored["release"] == 2 and new_digest in stored["digests"][MODEL]
        # Only now does the car open the file: IMA logs it, PCR 10 moves, and the verifier keeps attesting.
        count = bridge.verifier.agent(agent.uuid)["attestation_count"]
        agent.open_file(MODEL, new_model)
        seen = poll_states(bridge, agent.uuid,
                           lambda status: status and status["attestation_count"] >= count + 3, 20)
        assert all(state == 3 and token == "pass" for state, token in seen), seen
        assert not published.statuses("car5").count("revoked")

        # The wrong order: a third model opened with no policy update. The verifier fails the quote with
        # runtime_policy_hash (INVALID_QUOTE) and its own webhook revokes the car.
        agent.open_file(MODEL, b"model three")
        seen = poll_states(bridge, agent.uuid, lambda status: status and status["operational_state"] == 9, 20)
        assert seen[-1] == (9, "fail"), seen
        status = bridge.verifier.agent(agent.uuid)
        assert status["last_event_id"] == "ima.validation.ima-ng.runtime_policy_hash"
        wait_for(lambda: "revoked" in published.statuses("car5"), 10, "the verifier's webhook")
        print(f"policy settle took {settle_s:.2f} s")
    finally:
        server.shutdown()
        server.server_close()


def test_policy_requests_the_bridge_refuses(keylime, make_agent):
    agent, _ = attested_agent(keylime, make_agent, 6, b"model one")
    bridge, _, _ = make_bridge(keylime, {"car6": agent.uuid})
    sent: list[tuple[str, bytes]] = []
    sync = PolicySync(fleet=FLEET, car="car6", uuid=agent.uuid, publish=lambda t, p: sent.append((t, p)))
    digest = "ab" * 32
    cases = {
        "outside": ({"/usr/lib/python3/evil.py": [digest]}, "car6", "only paths under"),
        "other car": ({MODEL: [digest]}, "car7", "is not this bridge's car"),
    }
    for name, (digests, car, why) in cases.items():
        sync.request(digests)
        ready = bridge.handle_policy(car, sent[-1][1])
        assert ready is not None and not ready.ok and why in (ready.error or ""), (name, ready)
    other, _ = attested_agent(keylime, make_agent, 7, b"m")
    bridge.config.cars["car7"] = other.uuid
    bridge.config.policy_name = "no-such-{car}"
    sync.request({MODEL: [digest]})
    ready = bridge.handle_policy("car6", sent[-1][1])
    assert ready is not None and not ready.ok and "no runtime policy named 'no-such-car6'" in (ready.error or "")
    assert bridge.verifier.runtime_policy(agent.uuid)["digests"][MODEL] == [hashlib.sha256(b"model one").hexdigest()]


@pytest.mark.skipif(bool(mosquitto.available()), reason=mosquitto.available() or "ok")
def test_policy_request_over_mqtt_one_of_two_bridges_answers(keylime, make_agent, tmp_path):
    """Two bridge instances (serve()) on one broker: the shared subscription gives the request to one of them."""
    import asyncio

    import paho.mqtt.client as mqtt

    agent, _ = attested_agent(keylime, make_agent, 8, b"model one")
    broker = mosquitto.Broker(tmp_path).start()
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "fleet.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    config = BridgeConfig(fleet=FLEET, mqtt_url=f"mqtt://127.0.0.1:{broker.port}", signing_key=tmp_path / "fleet.key",
                          verifier_url=f"https://127.0.0.1:{keylime.port}", cars={"car8": agent.uuid},
                          verifier_ca=keylime.ca / "cacert.crt", verifier_cert=keylime.ca / "client-cert.crt",
                          verifier_key=keylime.ca / "client-private.pem", webhook="", poll_interval_s=0.5)
    stop = threading.Event()
    bridges = [threading.Thread(target=serve, args=(config, stop), daemon=True) for _ in range(2)]
    for thread in bridges:
        thread.start()
    readies: list[bytes] = []
    subscribed = threading.Event()
    car = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sync = PolicySync(fleet=FLEET, car="car8", uuid=agent.uuid, retry_s=30,
                      publish=lambda topic, payload: car.publish(topic, payload, qos=1))

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        readies.append(message.payload)
        sync.on_ready(message.payload)

    car.on_message = on_message
    car.on_subscribe = lambda *args: subscribed.set()
    car.on_connect = lambda client, *args: client.subscribe(sync.ready_topic, qos=1)
    car.connect("127.0.0.1", broker.port)
    car.loop_start()
    try:
        assert subscribed.wait(5)
        wait_for(lambda: (bridge_status := keylime.client().agent(agent.uuid)) and
                 bridge_status["attestation_count"] >= 1, 20, "first attestation")
        time.sleep(1.2)  # both bridges connected and subscribed (serve() waits 1 s for retained tokens)
        request_id = sync.request({MODEL: [hashlib.sha256(b"model two").hexdigest()]})
        assert asyncio.run(sync.wait_ready(request_id, 20))
        time.sleep(1.0)  # a second answer would have arrived by now
        assert len(readies) == 1, [json.loads(payload) for payload in readies]
        assert parse_ready(readies[0]).release == 2
    finally:
        stop.set()
        for thread in bridges:
            thread.join(5)
        car.loop_stop()
        car.disconnect()
        broker.stop()
