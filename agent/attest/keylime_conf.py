"""The local Keylime agent's identity and settings, read the way rust-keylime reads them.

Why: the car's token names its Keylime agent UUID, so the daemon must know it without asking the TPM or the
Keylime agent (whose API is mTLS-only). Precedence, as in rust-keylime (``keylime/src/config/file_config.rs``,
``base.rs``, ``env.rs``), later sources overriding earlier ones key by key:

1. built-in defaults;
2. ``/usr/etc/keylime/agent.conf``, then ``/usr/etc/keylime/agent.conf.d/*`` (sorted), then
   ``/etc/keylime/agent.conf``, then ``/etc/keylime/agent.conf.d/*`` (sorted); each a TOML file whose ``[agent]``
   table is read; missing files are skipped;
   **or**, when ``KEYLIME_AGENT_CONFIG`` is set and not empty, only that file (it must exist);
3. ``KEYLIME_AGENT_<KEY>`` environment variables (``KEYLIME_AGENT_UUID``, ``KEYLIME_AGENT_REGISTRAR_IP``...);
4. ``KEYLIME_DIR`` overrides ``keylime_dir``.

The UUID must be fixed: ``generate`` (and a malformed UUID, which rust-keylime silently replaces) gives a new one
on every start, and ``hash_ek`` is the hash of the TPM's endorsement key, unknown without reading the TPM.
"""

from __future__ import annotations

import os
import tomllib
import uuid as uuid_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import AgentError

DEFAULT_UUID = "d432fbb3-d2f1-4a97-9ef7-75bd81c00000"  # rust-keylime's DEFAULT_UUID: the same on every machine
CONFIG_ENV = "KEYLIME_AGENT_CONFIG"
ENV_PREFIX = "KEYLIME_AGENT_"
DEFAULT_SOURCES = (Path("/usr/etc/keylime/agent.conf"), Path("/usr/etc/keylime/agent.conf.d"),
                   Path("/etc/keylime/agent.conf"), Path("/etc/keylime/agent.conf.d"))
DEFAULTS: dict[str, Any] = {
    "uuid": DEFAULT_UUID,
    "ip": "127.0.0.1",
    "port": 9002,
    "contact_ip": "127.0.0.1",
    "contact_port": 9002,
    "registrar_ip": "127.0.0.1",
    "registrar_port": 8890,
    "keylime_dir": "/var/lib/keylime",
    "ima_ml_path": "default",
    "enable_agent_mtls": True,
    "enable_revocation_notifications": False,
    "tpm_hash_alg": "sha256",
    "tpm_encryption_alg": "rsa",
    "tpm_signing_alg": "rsassa",
    "run_as": "keylime:tss",
    "api_versions": "default",
}
DEFAULT_IMA_ML_PATH = "/sys/kernel/security/ima/ascii_runtime_measurements"
INTEGER_KEYS = frozenset({"port", "contact_port", "registrar_port", "revocation_notification_port"})
BOOLEAN_KEYS = frozenset({"enable_agent_mtls", "enable_revocation_notifications", "enable_insecure_payload",
                          "registrar_tls_enabled", "enable_iak_idevid", "extract_payload_zip",
                          "allow_payload_revocation_actions"})


class KeylimeConfigError(AgentError, ValueError):
    """The Keylime agent's settings cannot give this car a fixed identity; names the source and the key."""


@dataclass(frozen=True)
class KeylimeAgentSettings:
    """What the car needs from the Keylime agent's settings, with where each value came from."""

    uuid: str
    registrar_ip: str
    registrar_port: int
    contact_ip: str
    contact_port: int
    keylime_dir: Path
    ima_ml_path: Path
    settings: Mapping[str, Any]
    origins: Mapping[str, str]  # key -> file path, environment variable or "default"
    files: tuple[Path, ...] = field(default=())  # the files read, in order

    @property
    def registrar(self) -> str:
        return f"{self.registrar_ip}:{self.registrar_port}"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise KeylimeConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise KeylimeConfigError(f"{path}: not UTF-8 text (TOML must be UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeylimeConfigError(f"{path}: not valid TOML: {exc}") from None
    agent = data.get("agent", {})
    if not isinstance(agent, dict):
        raise KeylimeConfigError(f"{path}: agent: expected the [agent] table")
    return agent


def _expand(source: Path) -> list[Path]:
    """A file as itself, a snippet directory as its files in name order (rust-keylime globs ``dir/*``)."""
    if source.is_dir():
        return sorted(child for child in source.iterdir() if child.is_file())
    return [source] if source.is_file() else []


def _coerce(key: str, value: Any, origin: str) -> Any:
    if key in INTEGER_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise KeylimeConfigError(f"{origin}: {key}: expected a port number, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise KeylimeConfigError(f"{origin}: {key}: expected a port number, got {value!r}") from None
        if not 0 < number < 65536:
            raise KeylimeConfigError(f"{origin}: {key}: {number} is not a port (1-65535)")
        return number
    if key in BOOLEAN_KEYS and isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise KeylimeConfigError(f"{origin}: {key}: expected true or false, got {value!r}")
        return value.lower() == "true"
    return value


def _fixed_uuid(value: Any, origin: str, *, allow_default: bool) -> str:
    if not isinstance(value, str):
        raise KeylimeConfigError(f"{origin}: uuid: expected a string, got {value!r}")
    if value == "generate":
        raise KeylimeConfigError(f"{origin}: uuid: 'generate' gives the Keylime agent a new UUID on every start, "
                                 "so the car cannot know its own; set a fixed UUID (e.g. from uuidgen)")
    if value == "hash_ek":
        raise KeylimeConfigError(f"{origin}: uuid: 'hash_ek' is the hash of the TPM's endorsement key, which the "
                                 "car cannot know without reading the TPM; set a fixed UUID instead")
    try:
        parsed = str(uuid_module.UUID(value))
    except ValueError:
        raise KeylimeConfigError(f"{origin}: uuid: {value!r} is not a UUID (rust-keylime would replace it with a "
                                 "random one at every start)") from None
    if parsed == DEFAULT_UUID and not allow_default:
        raise KeylimeConfigError(f"{origin}: uuid: {DEFAULT_UUID} is rust-keylime's built-in default, the same on "
                                 "every machine: the registrar refuses a second TPM under it; give each car its own")
    return parsed


def read_agent_settings(sources: tuple[Path, ...] = DEFAULT_SOURCES, environ: Mapping[str, str] | None = None, *,
                        allow_default_uuid: bool = False) -> KeylimeAgentSettings:
    """Read the settings as rust-keylime would; raise ``KeylimeConfigError`` naming the file (or variable) and key."""
    env = os.environ if environ is None else environ
    settings: dict[str, Any] = dict(DEFAULTS)
    origins = dict.fromkeys(DEFAULTS, "default")
    override = env.get(CONFIG_ENV, "")
    if override:
        path = Path(override)
        if not path.is_file():
            raise KeylimeConfigError(f"{CONFIG_ENV}={override}: no such file (rust-keylime refuses to start)")
        files = [path]
    else:
        files = [item for source in sources for item in _expand(source)]
    for path in files:
        for key, value in _read_toml(path).items():
            settings[key] = _coerce(key, value, str(path))
            origins[key] = str(path)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name != CONFIG_ENV:
            key = name[len(ENV_PREFIX):].lower()
            settings[key] = _coerce(key, value, name)
            origins[key] = name
    if env.get("KEYLIME_DIR"):
        settings["keylime_dir"] = env["KEYLIME_DIR"]
        origins["keylime_dir"] = "KEYLIME_DIR"
    agent_uuid = _fixed_uuid(settings["uuid"], origins["uuid"], allow_default=allow_default_uuid)
    for key in ("registrar_ip", "contact_ip"):
        if not isinstance(settings[key], str) or not settings[key]:
            raise KeylimeConfigError(f"{origins[key]}: {key}: expected a host name or address, got {settings[key]!r}")
    ima_ml = str(settings.get("ima_ml_path") or "default")  # relative paths are from "/", as rust-keylime does
    ima_ml_path = Path(DEFAULT_IMA_ML_PATH) if ima_ml == "default" else Path("/") / ima_ml
    return KeylimeAgentSettings(
        uuid=agent_uuid, registrar_ip=settings["registrar_ip"], registrar_port=settings["registrar_port"],
        contact_ip=settings["contact_ip"], contact_port=settings["contact_port"],
        keylime_dir=Path(str(settings["keylime_dir"])), ima_ml_path=ima_ml_path, settings=settings,
        origins=origins, files=tuple(files))
