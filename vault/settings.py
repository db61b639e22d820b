"""One typed settings object, built once from the environment and validated at start-up.

Nothing else in the code base reads ``os.environ``: every knob is a field here, and every
malformed value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

from vault.apikeys import InvalidAPIKeys, parse_api_keys, parse_token
from vault.crypto import MalformedKey, key_id, parse_key
from vault.validation import DEFAULT_MAX_SECRET_BYTES

DEFAULT_MAX_TTL_SECONDS = 315_360_000  # ten years
MAX_READS = 1_000_000
DEFAULT_RATE_LIMIT = "100/second;3000/minute"
_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
DEFAULT_RATE_LIMITS = ((100, 1), (3000, 60))


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable and the fix."""


@dataclass(frozen=True)
class Settings:
    """Everything the service can be configured with. Secret fields are kept out of repr."""

    master_key: bytes | None = field(default=None, repr=False)
    previous_keys: tuple[bytes, ...] = field(default=(), repr=False)
    # Key ids whose records may stay unreadable on purpose: the key guard lets serve and
    # rewrap start despite them (and still refuses any other key id it cannot open).
    retired_key_ids: tuple[str, ...] = ()
    mongo_uri: str | None = field(default=None, repr=False)
    mongo_db: str = "vault"
    mongo_write_concern: str | int = "majority"
    mongo_journal: bool = True
    mongo_pool_size: int = 32
    store_timeout_seconds: float = 4.0
    data_dir: Path = Path("data")
    max_secret_bytes: int = DEFAULT_MAX_SECRET_BYTES
    max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS
    default_ttl_seconds: int = 0  # 0: a create that names no ttl_seconds never expires
    purge_interval_seconds: float = 60.0
    graceful_timeout_seconds: float = 10.0
    read_timeout_seconds: int = 10
    keep_alive_timeout_seconds: float = 5.0
    api_keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    metrics_token_digest: bytes | None = field(default=None, repr=False)
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    log_level: str = "INFO"
    audit_enabled: bool = True
    audit_mode: str = "sync"
    audit_ttl_days: int = 0
    audit_stdout: bool = False
    audit_hmac_key: bytes | None = field(default=None, repr=False)
    rate_limits: tuple[tuple[int, int], ...] = DEFAULT_RATE_LIMITS
    rate_limit_storage: str = field(default="memory", repr=False)
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    metrics_enabled: bool = True
    prometheus_multiproc_dir: Path | None = None
    traces_exporter: str = "none"
    service_name: str = "secret-manager"

    @property
    def max_body_bytes(self) -> int:
        """Hard cap on a request body: the base64 of the largest secret plus room for JSON."""
        return 4 * -(-self.max_secret_bytes // 3) + 16384

    @property
    def dev_key_path(self) -> Path:
        return self.data_dir / "master.key"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise ConfigError naming the first bad one."""
        env = os.environ if environ is None else environ
        master = _secret_value(env, "MASTER_KEY", strip=False)
        master_key = None if master is None else _key(master, "MASTER_KEY")
        previous_raw = _secret_value(env, "MASTER_KEY_PREVIOUS", strip=True) or ""
        previous = tuple(
            _key(part.strip(), "MASTER_KEY_PREVIOUS")
            for part in previous_raw.replace("\n", ",").split(",")
            if part.strip()
        )
        max_ttl = _int(env, "SECRET_MAX_TTL_SECONDS", DEFAULT_MAX_TTL_SECONDS, minimum=1)
        default_ttl = _int(env, "SECRET_DEFAULT_TTL_SECONDS", 0, minimum=0)
        if default_ttl > max_ttl:
            raise ConfigError(
                f"SECRET_DEFAULT_TTL_SECONDS ({default_ttl}) must not exceed "
                f"SECRET_MAX_TTL_SECONDS ({max_ttl}); use 0 for secrets that never expire"
            )
        return cls(
            master_key=master_key,
            previous_keys=previous,
            retired_key_ids=_retired_key_ids(env, master_key, previous),
            mongo_uri=_secret_value(env, "MONGO_URI", strip=True) or None,
            mongo_db=_name(env, "MONGO_DB", "vault"),
            mongo_write_concern=_write_concern(env.get("MONGO_WRITE_CONCERN", "majority")),
            mongo_journal=_bool(env, "MONGO_JOURNAL", True),
            mongo_pool_size=_int(env, "MONGO_POOL_SIZE", 32, minimum=1),
            store_timeout_seconds=_float(env, "STORE_TIMEOUT_SECONDS", 4.0, minimum=0.1),
            data_dir=Path(env.get("DATA_DIR", "data") or "data"),
            max_secret_bytes=_int(env, "MAX_SECRET_BYTES", DEFAULT_MAX_SECRET_BYTES, minimum=1),
            max_ttl_seconds=max_ttl,
            default_ttl_seconds=default_ttl,
            purge_interval_seconds=_float(env, "SECRET_PURGE_INTERVAL_SECONDS", 60.0, minimum=1.0),
            graceful_timeout_seconds=_float(env, "GRACEFUL_TIMEOUT_SECONDS", 10.0, minimum=0),
            read_timeout_seconds=_int(env, "READ_TIMEOUT_SECONDS", 10, minimum=1),
            keep_alive_timeout_seconds=_float(env, "KEEP_ALIVE_TIMEOUT_SECONDS", 5.0, minimum=0.1),
            api_keys=_api_keys(env),
            metrics_token_digest=_metrics_token(env),
            tls_certfile=_tls_files(env)[0],
            tls_keyfile=_tls_files(env)[1],
            log_level=_choice(
                env, "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
            ),
            audit_enabled=_bool(env, "AUDIT_ENABLED", True),
            audit_mode=_choice(env, "AUDIT_MODE", "SYNC", ("SYNC", "ASYNC")).lower(),
            audit_ttl_days=_int(env, "AUDIT_TTL_DAYS", 0, minimum=0),
            audit_stdout=_bool(env, "AUDIT_STDOUT", False),
            audit_hmac_key=_hmac_key(env),
            rate_limits=parse_rate_limits(env.get("RATE_LIMIT") or DEFAULT_RATE_LIMIT),
            rate_limit_storage=_rate_limit_storage(env.get("RATE_LIMIT_STORAGE") or "memory"),
            trusted_proxies=_networks(env.get("TRUSTED_PROXIES") or ""),
            metrics_enabled=_bool(env, "METRICS_ENABLED", True),
            prometheus_multiproc_dir=(
                Path(env["PROMETHEUS_MULTIPROC_DIR"])
                if env.get("PROMETHEUS_MULTIPROC_DIR")
                else None
            ),
            traces_exporter=_traces_exporter(env.get("OTEL_TRACES_EXPORTER") or "none"),
            service_name=(env.get("OTEL_SERVICE_NAME") or "secret-manager").strip(),
        )


def _secret_value(env: Mapping[str, str], name: str, *, strip: bool) -> str | None:
    """Read NAME or NAME_FILE (a Docker secret); both at once is ambiguous and refused."""
    direct = env.get(name)
    path = env.get(f"{name}_FILE")
    if direct is not None and path is not None:
        raise ConfigError(f"{name} and {name}_FILE are both set; set only one of them")
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{name}_FILE={path!r} cannot be read: {reason}") from None
    if direct is None:
        return None
    return direct.strip() if strip else direct


_KEY_ID = re.compile(r"[0-9a-f]{16}")


def _retired_key_ids(
    env: Mapping[str, str], master_key: bytes | None, previous: tuple[bytes, ...]
) -> tuple[str, ...]:
    """RETIRED_KEY_IDS: key ids as the key guard and rewrap print them, comma-separated.

    A configured key's id is refused: its records open, so listing it would only hide a
    later mistake (that key removed by accident) from the guard.
    """
    raw = env.get("RETIRED_KEY_IDS") or ""
    ids = [part.strip().lower() for part in raw.replace("\n", ",").split(",") if part.strip()]
    for kid in ids:
        if not _KEY_ID.fullmatch(kid):
            raise ConfigError(
                "RETIRED_KEY_IDS must be comma-separated key ids of 16 hex digits, as the "
                f"start-up refusal and rewrap print them; got {kid[:40]!r}"
            )
    configured = {key_id(key) for key in (master_key, *previous) if key is not None}
    for kid in ids:
        if kid in configured:
            raise ConfigError(
                f"RETIRED_KEY_IDS lists {kid}, the id of a configured key (MASTER_KEY or "
                "MASTER_KEY_PREVIOUS), whose records open: remove it from RETIRED_KEY_IDS"
            )
    return tuple(dict.fromkeys(ids))


def parse_rate_limits(text: str) -> tuple[tuple[int, int], ...]:
    """``100/second;2000/minute`` → ((100, 1), (2000, 60)); ``off`` → (). Names RATE_LIMIT."""
    if text.strip().lower() == "off":
        return ()
    limits = []
    for part in text.split(";"):
        count, _, unit = part.strip().partition("/")
        unit = unit.strip().lower().removesuffix("s")
        if not count.strip().isdigit() or int(count) < 1 or unit not in _PERIODS:
            raise ConfigError(
                f"RATE_LIMIT must look like '50/second' or '100/second;2000/minute' "
                f"(units: second, minute, hour, day) or 'off', got {text!r}"
            )
        limits.append((int(count), _PERIODS[unit]))
    return tuple(limits)


def _api_keys(env: Mapping[str, str]) -> tuple[tuple[str, bytes], ...]:
    """API_KEYS / API_KEYS_FILE as (name, SHA-256 of token) pairs; tokens are not kept."""
    text = _secret_value(env, "API_KEYS", strip=True)
    if text is None:
        return ()
    source = "API_KEYS_FILE" if env.get("API_KEYS_FILE") is not None else "API_KEYS"
    try:
        return tuple(parse_api_keys(text, source=source).items())
    except InvalidAPIKeys as exc:
        raise ConfigError(str(exc)) from None


def _metrics_token(env: Mapping[str, str]) -> bytes | None:
    text = _secret_value(env, "METRICS_TOKEN", strip=True)
    if text is None:
        return None
    source = "METRICS_TOKEN_FILE" if env.get("METRICS_TOKEN_FILE") is not None else "METRICS_TOKEN"
    try:
        return parse_token(text, source=source)
    except InvalidAPIKeys as exc:
        raise ConfigError(str(exc)) from None


def _tls_files(env: Mapping[str, str]) -> tuple[Path | None, Path | None]:
    """TLS_CERT_FILE and TLS_KEY_FILE: both (Hypercorn serves HTTPS) or neither."""
    cert, key = env.get("TLS_CERT_FILE") or None, env.get("TLS_KEY_FILE") or None
    if (cert is None) != (key is None):
        raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE must be set together (or neither)")
    if cert is None or key is None:
        return None, None
    for name, value in (("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", key)):
        if not os.access(value, os.R_OK):
            raise ConfigError(f"{name}={value!r} is not a readable file")
    return Path(cert), Path(key)


def _hmac_key(env: Mapping[str, str]) -> bytes | None:
    value = _secret_value(env, "AUDIT_HMAC_KEY", strip=True)
    if value is None:
        return None
    if len(value.encode("utf-8")) < 32:
        raise ConfigError(
            "AUDIT_HMAC_KEY must be at least 32 characters (try `secret-manager genkey`)"
        )
    return value.encode("utf-8")


def _rate_limit_storage(raw: str) -> str:
    value = raw.strip()
    if value == "memory" or value.startswith(("mongodb://", "mongodb+srv://")):
        return value
    raise ConfigError(
        "RATE_LIMIT_STORAGE must be 'memory' or a mongodb:// URI (one limit for all replicas)"
    )


def _networks(raw: str) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for part in raw.replace(";", ",").split(","):
        if not part.strip():
            continue
        try:
            networks.append(ip_network(part.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"TRUSTED_PROXIES must be comma-separated addresses or CIDRs like 10.0.0.0/8, "
                f"got {part.strip()!r}"
            ) from None
    return tuple(networks)


def _traces_exporter(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("none", "console", "otlp"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp, console or none, got {raw!r}")
    return value


def _key(value: str, name: str) -> bytes:
    try:
        return parse_key(value)
    except MalformedKey as exc:
        raise ConfigError(f"{name} is malformed: {exc}") from None


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value >= minimum:  # also rejects nan
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().upper()
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return value


def _name(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, default).strip()
    if not raw or any(c in raw for c in '/\\. "$\x00') or len(raw) > 63:
        raise ConfigError(
            f"{name} must be a MongoDB database name (1-63 characters, no '/\\. \"$'), got {raw!r}"
        )
    return raw


def _write_concern(raw: str) -> str | int:
    value = raw.strip()
    if value == "majority":
        return value
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(
            f"MONGO_WRITE_CONCERN must be 'majority' or a number of nodes, got {raw!r}"
        ) from None
    if number < 1:
        raise ConfigError(
            "MONGO_WRITE_CONCERN must be at least 1: an unacknowledged write could be lost"
        )
    return number


def client_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The API key the ``create``, ``fetch`` and ``delete`` commands send: SECRET_MANAGER_TOKEN.

    Surrounding whitespace (a CRLF env file) is dropped; a token a Bearer header cannot carry
    is a ConfigError that never quotes it, instead of an HTTP library error that would.
    """
    env = os.environ if environ is None else environ
    token = env.get("SECRET_MANAGER_TOKEN", "").strip()
    if not token:
        return None
    try:
        parse_token(token, source="SECRET_MANAGER_TOKEN")
    except InvalidAPIKeys as exc:
        raise ConfigError(str(exc)) from None
    return token


def client_url(environ: Mapping[str, str] | None = None) -> str:
    """Where the ``create``, ``fetch`` and ``delete`` commands send requests: SECRET_MANAGER_URL."""
    env = os.environ if environ is None else environ
    return env.get("SECRET_MANAGER_URL") or "http://localhost:8000"
