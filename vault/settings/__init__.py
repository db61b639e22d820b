"""One typed settings object, built once from the environment and validated at start-up.

Each setting is declared once, as a field of ``Settings`` made by ``setting(...)``: its
environment variable, its parser, its default (written as it would be in the environment,
and parsed like any other value) and what it means, in the manner of starlette.config's
``config(key, cast=..., default=...)``. ``Settings.from_env`` reads every field from that
table, and docs/configuration.md's table is checked against it (tests/test_docs.py).

Nothing else in the code base reads ``os.environ`` (but vault.client, the public client,
which reads the two client variables declared here itself: it must not import the server's
settings, and tests/test_client.py checks that both read them alike), and every malformed
value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, cast

from vault.apikeys import KeyTable
from vault.crypto import key_id
from vault.errors import ConfigError as ConfigError  # what every caller catches
from vault.settings import parse
from vault.settings.variables import Variable, setting

MAX_READS = 1_000_000


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


class AuditMode(StrEnum):
    SYNC = "sync"  # no answer before its audit record is durably written
    ASYNC = "async"  # answer at once, write in the background


class TracesExporter(StrEnum):
    NONE = "none"
    CONSOLE = "console"
    OTLP = "otlp"


class RateLimitStorage(StrEnum):
    """Where rate-limit counts live: this process, or else the ``mongodb://`` URI given."""

    MEMORY = "memory"


def _rate_limit_storage(value: str, name: str) -> str:
    raw = value.strip()
    if raw == RateLimitStorage.MEMORY:
        return RateLimitStorage.MEMORY
    if raw.startswith(("mongodb://", "mongodb+srv://")):
        return raw
    raise ConfigError(f"{name} must be 'memory' or a mongodb:// URI (one limit for all replicas)")


@dataclass(frozen=True)
class Settings:
    """Everything the service can be configured with: the table of settings.

    Secret fields are kept out of repr. Start with ``Settings.from_env()``; the defaults
    here are what an empty environment gives.
    """

    master_key: bytes | None = setting(
        "MASTER_KEY",
        parse.key,
        None,
        "the active key; new secrets are sealed with it",
        secret=True,
        blank_is_default=False,
    )
    previous_keys: tuple[bytes, ...] = setting(
        "MASTER_KEY_PREVIOUS",
        parse.keys,
        None,
        "older keys, used only to open what they sealed",
        unset=(),
        secret=True,
    )
    # Key ids whose records may stay unreadable on purpose: the key guard lets serve and
    # rewrap start despite them (and still refuses any other key id it cannot open).
    retired_key_ids: tuple[str, ...] = setting(
        "RETIRED_KEY_IDS", parse.key_ids, None, "ids of keys retired on purpose", unset=()
    )
    mongo_uri: str | None = setting(
        "MONGO_URI", parse.text, None, "MongoDB connection string; unset: SQLite", secret=True
    )
    mongo_db: str = setting(
        "MONGO_DB", parse.database_name, "vault", "the MongoDB database", blank_is_default=False
    )
    mongo_write_concern: str | int = setting(
        "MONGO_WRITE_CONCERN",
        parse.write_concern,
        "majority",
        "write concern of secret inserts",
        blank_is_default=False,
    )
    mongo_journal: bool = setting(
        "MONGO_JOURNAL", parse.boolean, "true", "whether secret inserts wait for the journal"
    )
    mongo_pool_size: int = setting(
        "MONGO_POOL_SIZE", parse.whole(1), "32", "pymongo's maxPoolSize, and store threads at once"
    )
    store_timeout_seconds: float = setting(
        "STORE_TIMEOUT_SECONDS", parse.seconds(0.1), "4", "budget of one store call"
    )
    data_dir: Path = setting(
        "DATA_DIR", parse.path, "./data", "where vault.db and the --dev key live"
    )
    max_secret_bytes: int = setting(
        "MAX_SECRET_BYTES", parse.whole(1), "65536", "largest secret, in bytes once decoded"
    )
    max_ttl_seconds: int = setting(
        "SECRET_MAX_TTL_SECONDS", parse.whole(1), "315360000", "largest ttl_seconds (ten years)"
    )
    idempotency_ttl_seconds: int = setting(
        "IDEMPOTENCY_TTL_SECONDS",
        parse.whole(1),
        "86400",
        "how long a create's Idempotency-Key answers its repeats",
    )
    passphrase_max_attempts: int = setting(
        "PASSPHRASE_MAX_ATTEMPTS",
        parse.whole(1),
        "5",
        "wrong passphrases after which a secret is deleted",
    )
    receipt_retention_seconds: int = setting(
        "RECEIPT_RETENTION_SECONDS",
        parse.whole(0),
        "2592000",
        "how long a receipt answers after its secret ended (30 days)",
    )
    default_ttl_seconds: int = setting(
        "SECRET_DEFAULT_TTL_SECONDS",
        parse.whole(0),
        "0",
        "ttl of a create that names none; 0: never",
    )
    purge_interval_seconds: float = setting(
        "SECRET_PURGE_INTERVAL_SECONDS", parse.seconds(1.0), "60", "how often expired secrets go"
    )
    retry_after_seconds: int = setting(
        "RETRY_AFTER_SECONDS", parse.whole(1), "5", "the Retry-After of every 503"
    )
    graceful_timeout_seconds: float = setting(
        "GRACEFUL_TIMEOUT_SECONDS", parse.seconds(0), "10", "how long shutdown waits for requests"
    )
    read_timeout_seconds: int = setting(
        "READ_TIMEOUT_SECONDS", parse.whole(1), "10", "a silent connection, or a whole body, within"
    )
    keep_alive_timeout_seconds: float = setting(
        "KEEP_ALIVE_TIMEOUT_SECONDS", parse.seconds(0.1), "5", "an idle connection is closed after"
    )
    api_keys: KeyTable = setting(
        "API_KEYS",
        parse.api_keys,
        None,
        "[tenant/]name:token[:scopes] entries; /vault calls must present one",
        unset=KeyTable(),
        secret=True,
        blank_is_default=False,
    )
    metrics_token_digest: bytes | None = setting(
        "METRICS_TOKEN",
        parse.token_digest,
        None,
        "the token /metrics asks for (its SHA-256)",
        secret=True,
        blank_is_default=False,
    )
    tls_certfile: Path | None = setting(
        "TLS_CERT_FILE", parse.path, None, "PEM certificate chain: HTTPS"
    )
    tls_keyfile: Path | None = setting(
        "TLS_KEY_FILE", parse.path, None, "its unencrypted PEM private key"
    )
    log_level: LogLevel = setting(
        "LOG_LEVEL", parse.choice(LogLevel), "INFO", "the log's threshold"
    )
    audit_enabled: bool = setting(
        "AUDIT_ENABLED", parse.boolean, "true", "record every /vault request in the audit log"
    )
    audit_mode: AuditMode = setting(
        "AUDIT_MODE", parse.choice(AuditMode), "sync", "wait for the audit record, or not"
    )
    audit_ttl_days: int = setting(
        "AUDIT_TTL_DAYS", parse.whole(0), "0", "keep audit records this many days; 0: forever"
    )
    audit_stdout: bool = setting(
        "AUDIT_STDOUT", parse.boolean, "false", "also print each audit record on standard output"
    )
    audit_hmac_key: bytes | None = setting(
        "AUDIT_HMAC_KEY",
        parse.hmac_key,
        None,
        "key of the HMAC naming secret ids in the audit log",
        secret=True,
        blank_is_default=False,
    )
    rate_limits: tuple[tuple[int, int], ...] = setting(
        "RATE_LIMIT", parse.rate_limits, "100/second;3000/minute", "requests per client IP"
    )
    rate_limits_per_key: tuple[tuple[int, int], ...] = setting(
        "RATE_LIMIT_PER_KEY", parse.rate_limits, "off", "requests per API key, as RATE_LIMIT"
    )
    rate_limit_storage: str = setting(
        "RATE_LIMIT_STORAGE",
        _rate_limit_storage,
        "memory",
        "memory, or a mongodb:// URI",
        secret=True,  # a URI may hold a password: also RATE_LIMIT_STORAGE_FILE, never shown
    )
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = setting(
        "TRUSTED_PROXIES",
        parse.networks,
        None,
        "proxies whose X-Forwarded-For is believed",
        unset=(),
    )
    metrics_enabled: bool = setting(
        "METRICS_ENABLED", parse.boolean, "true", "serve /metrics and measure requests"
    )
    # prometheus_client reads this variable itself too (vault/cli/serve.py says why).
    prometheus_multiproc_dir: Path | None = setting(
        "PROMETHEUS_MULTIPROC_DIR", parse.path, None, "several workers' metric values"
    )
    traces_exporter: TracesExporter = setting(
        "OTEL_TRACES_EXPORTER",
        parse.choice(TracesExporter),
        "none",
        "where spans go; none: no tracing",
    )
    service_name: str = setting(
        "OTEL_SERVICE_NAME", parse.text, "secret-manager", "service.name of the spans"
    )
    # Webhooks (vault/webhooks.py): lifecycle events, signed, to the operator's receivers.
    webhook_urls: tuple[str, ...] = setting(
        "WEBHOOK_URLS",
        parse.webhook_urls,
        None,
        "receivers of lifecycle events, comma-separated; none: no webhooks",
        unset=(),
        secret=True,  # a receiver's URL may carry its token: also WEBHOOK_URLS_FILE
    )
    webhook_secret: bytes | None = setting(
        "WEBHOOK_SECRET",
        parse.webhook_secret,
        None,
        "whsec_ key every delivery is signed with",
        secret=True,
    )
    webhook_events: tuple[str, ...] = setting(
        "WEBHOOK_EVENTS", parse.event_types, "all", "which lifecycle events are delivered"
    )
    webhook_timeout_seconds: float = setting(
        "WEBHOOK_TIMEOUT_SECONDS", parse.seconds(0.1), "10", "a receiver answers 2xx within"
    )
    webhook_max_age_seconds: float = setting(
        "WEBHOOK_MAX_AGE_SECONDS", parse.seconds(1.0), "86400", "an event is retried for"
    )
    # Not a variable of its own: the file API_KEYS was read from (API_KEYS_FILE), made
    # absolute, which SIGHUP reads again (vault/apikeys.py); None when the keys came from
    # API_KEYS or there are none.
    api_keys_file: Path | None = field(default=None, repr=False)

    @property
    def max_body_bytes(self) -> int:
        """Hard cap on a request body: the base64 of the largest secret plus room for JSON."""
        return 4 * -(-self.max_secret_bytes // 3) + 16384

    @property
    def emitted_events(self) -> frozenset[str]:
        """The event types the stores write to the outbox: WEBHOOK_EVENTS while webhooks are
        on (WEBHOOK_URLS set), else none (nothing would deliver them)."""
        return frozenset(self.webhook_events) if self.webhook_urls else frozenset()

    @property
    def dev_key_path(self) -> Path:
        return self.data_dir / "master.key"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dev_key_file: Path | None = None
    ) -> Settings:
        """Read and validate every variable; raise ConfigError naming the first bad one.

        ``dev_key_file`` is the key file ``--dev`` uses when neither MASTER_KEY nor
        MASTER_KEY_FILE is set: it is read as MASTER_KEY_FILE would be.
        """
        env = os.environ if environ is None else environ
        if dev_key_file is not None and "MASTER_KEY" not in env and "MASTER_KEY_FILE" not in env:
            env = {**env, "MASTER_KEY_FILE": str(dev_key_file)}
        values = {item.name: item.metadata["variable"].read(env) for item in _settings_fields()}
        if "API_KEYS_FILE" in env:
            values["api_keys_file"] = Path(env["API_KEYS_FILE"]).absolute()
        settings = cls(**values)
        settings._check_together()
        return settings

    def _check_together(self) -> None:
        """The rules that join two settings."""
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise ConfigError(
                f"SECRET_DEFAULT_TTL_SECONDS ({self.default_ttl_seconds}) must not exceed "
                f"SECRET_MAX_TTL_SECONDS ({self.max_ttl_seconds}); use 0 for secrets that "
                "never expire"
            )
        if self.rate_limits_per_key and not self.api_keys:
            # Refused rather than ignored: an operator who set it believes callers are held
            # to it, and without keys there is no key to count by.
            raise ConfigError(
                "RATE_LIMIT_PER_KEY is set but API keys are off, so it would limit nothing: "
                "set API_KEYS or API_KEYS_FILE, or set RATE_LIMIT_PER_KEY=off"
            )
        if self.webhook_urls and self.webhook_secret is None:
            raise ConfigError(
                "WEBHOOK_URLS is set but WEBHOOK_SECRET (or WEBHOOK_SECRET_FILE) is not: every "
                "delivery is signed with it (whsec_ and base64 of 24 to 64 random bytes)"
            )
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE must be set together (or neither)")
        for name, file in (
            ("TLS_CERT_FILE", self.tls_certfile),
            ("TLS_KEY_FILE", self.tls_keyfile),
        ):
            if file is not None and not os.access(file, os.R_OK):
                raise ConfigError(f"{name}={str(file)!r} is not a readable file")
        # A configured key's id is refused: its records open, so listing it would only hide
        # a later mistake (that key removed by accident) from the guard.
        configured = {
            key_id(key) for key in (self.master_key, *self.previous_keys) if key is not None
        }
        for kid in self.retired_key_ids:
            if kid in configured:
                raise ConfigError(
                    f"RETIRED_KEY_IDS lists {kid}, the id of a configured key (MASTER_KEY or "
                    "MASTER_KEY_PREVIOUS), whose records open: remove it from RETIRED_KEY_IDS"
                )


# Named elsewhere (the API's limits, the stores' budget): each is the table's default.
DEFAULT_MAX_TTL_SECONDS: int = Settings.max_ttl_seconds
DEFAULT_STORE_TIMEOUT_SECONDS: float = Settings.store_timeout_seconds

# The client side: read by the create, fetch, delete and status commands, and by
# vault.client itself (which keeps these names and defaults; tests/test_client.py checks).
SECRET_MANAGER_URL: Variable[str] = Variable(
    "SECRET_MANAGER_URL", parse.verbatim, "http://localhost:8000", "where the client sends requests"
)
SECRET_MANAGER_TOKEN: Variable[str] = Variable(
    "SECRET_MANAGER_TOKEN", parse.bearer_token, None, "the API key the client sends"
)


def _settings_fields() -> Iterator[Field[Any]]:
    """The fields of Settings read from a variable each (not those derived from one)."""
    return (item for item in fields(Settings) if "variable" in item.metadata)


def all_variables() -> Iterator[Variable[Any]]:
    """Every variable the service and its client read, in the order of the docs' table."""
    for item in _settings_fields():
        yield item.metadata["variable"]
    yield from (SECRET_MANAGER_URL, SECRET_MANAGER_TOKEN)


def client_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The API key the client commands (``create``, ``fetch``, ...) send: SECRET_MANAGER_TOKEN.

    Surrounding whitespace (a CRLF env file) is dropped; a token a Bearer header cannot carry
    is a ConfigError that never quotes it, instead of an HTTP library error that would.
    """
    return SECRET_MANAGER_TOKEN.read(os.environ if environ is None else environ)


def client_url(environ: Mapping[str, str] | None = None) -> str:
    """Where the client commands (``create``, ``fetch``, ...) send requests: SECRET_MANAGER_URL."""
    return cast(str, SECRET_MANAGER_URL.read(os.environ if environ is None else environ))
