"""The app factory: settings → keyring and store → route table → middleware stack."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from middleware.apikeys import APIKeyMiddleware, LiveKeys
from middleware.audit import AuditMiddleware, AuditWriter, stdout_stream
from middleware.bodylimit import BodyLimitMiddleware
from middleware.clientip import ClientIPMiddleware
from middleware.context import request_context
from middleware.errors import InternalErrorMiddleware
from middleware.metrics import PrometheusMiddleware
from middleware.ratelimit import (
    COUNTER_RETRY_SECONDS,
    PER_API_KEY,
    Counter,
    MemoryCounter,
    RateLimitMiddleware,
)
from middleware.requestid import RequestIdMiddleware
from middleware.securityheaders import SecurityHeadersMiddleware
from middleware.tracing import TracingMiddleware
from observability.logging import configure_logging
from observability.metrics import (
    ACCESS_DENIED,
    AUDIT_RECORDS,
    RATE_LIMITED,
    SECRETS_PURGED,
    metrics_app,
)
from observability.tracing import configure_tracing, shutdown_tracing
from vault import hypercorn_fixes
from vault.apikeys import reload_key_file
from vault.backend import backend_for
from vault.breaker import CircuitBreaker
from vault.crypto import Keyring, derive_audit_key, secret_id_hmac
from vault.errors import ConfigError, StoreKnownDown, StoreUnavailable
from vault.keyguard import UnreadableRecords
from vault.routes import OPERATIONS, VaultAPI, http_error, unavailable_response
from vault.settings import AuditMode, RateLimitStorage, Settings
from vault.stores.base import SecretStore
from vault.stores.counters import MongoCounter
from vault.webhooks import Deliverer

log = logging.getLogger("secret_manager.app")

# How long start-up waits for the first count of records no configured key can open.
FIRST_COUNT_SECONDS = 2.0


def build_keyring(settings: Settings) -> Keyring:
    """The keyring for these settings; ConfigError if no active key is configured."""
    if settings.master_key is None:
        raise ConfigError(
            "MASTER_KEY is not set: set MASTER_KEY or MASTER_KEY_FILE to a key from "
            "`secret-manager genkey`, or on a laptop add --dev to use DATA_DIR/master.key"
        )
    return Keyring(settings.master_key, settings.previous_keys)


def audit_hmac_key(settings: Settings) -> bytes:
    """AUDIT_HMAC_KEY, or by default a key derived from the active master key."""
    if settings.audit_hmac_key is not None:
        return settings.audit_hmac_key
    if settings.master_key is None:
        raise ConfigError("MASTER_KEY (or AUDIT_HMAC_KEY) is needed to hash secret ids")
    return derive_audit_key(settings.master_key)


def audit_hmac_keys(settings: Settings) -> tuple[bytes, ...]:
    """Every key the audit log may have named secret ids under, the one in use first.

    Without AUDIT_HMAC_KEY the audit key follows the master key, so records written before
    a rotation carry HMACs under a key derived from a previous master key.
    """
    active = audit_hmac_key(settings)
    if settings.audit_hmac_key is not None:
        return (active,)
    return (active, *(derive_audit_key(key) for key in settings.previous_keys))


def build_audit_writer(settings: Settings, store: SecretStore) -> AuditWriter:
    """Records go to the service's own store, whose batched insert groups concurrent ones
    into one write; their outcomes are counted in the metrics."""
    return AuditWriter(
        store.insert_audit,
        wait=settings.audit_mode == AuditMode.SYNC,
        stdout=stdout_stream() if settings.audit_stdout else None,
        on_written=AUDIT_RECORDS.labels("written").inc,
        on_failed=AUDIT_RECORDS.labels("failed").inc,
    )


def build_counter(settings: Settings) -> Counter:
    """Per-process counting, or one MongoDB collection shared by every replica."""
    if settings.rate_limit_storage == RateLimitStorage.MEMORY:
        return MemoryCounter()
    return MongoCounter(
        settings.rate_limit_storage,
        database=settings.mongo_db,
        timeout=min(settings.store_timeout_seconds, 2.0),
    )


async def _keep_audit_retention(store: SecretStore, ttl_days: int) -> None:
    """Apply retention at start, then hourly; retry each minute while the store is down."""
    while True:
        try:
            await store.apply_audit_retention(ttl_days)
            delay = 3600
        except Exception as exc:  # the store may be down at start; keep trying
            log.warning("audit retention not applied yet: %s", type(exc).__name__)
            delay = 60
        await asyncio.sleep(delay)


def body_deadline(read_timeout: float) -> float:
    """The app's deadline for a whole body: half a second inside Hypercorn's read timeout.

    Both start when the request's head has been read. Were they equal, a busy event loop
    could let Hypercorn close the silent connection first, and the caller would get a 400
    ("did not arrive completely") or nothing, instead of the 408 that says what happened.
    """
    return max(read_timeout - 0.5, read_timeout / 2)


async def _keep_purging(
    store: SecretStore,
    interval: float,
    unreadable: UnreadableRecords | None = None,
    receipt_retention_seconds: float | None = None,
) -> None:
    """Remove expired and used-up records at start, then every ``interval`` seconds, and
    the receipts past their retention; after each round, count again the records no
    configured key can open (``unreadable``).

    Only tidiness: an expired secret is refused on read whether or not it was purged, and a
    receipt past its retention answers 404 whether or not it was.
    """
    while True:
        try:
            purged = await store.purge_expired()
            if receipt_retention_seconds is not None:
                await store.purge_receipts(receipt_retention_seconds)
            await store.purge_idempotency()
        except Exception as exc:  # the store may be down; the next round tries again
            log.warning("expired secrets not purged yet: %s", type(exc).__name__)
        else:
            if purged:
                SECRETS_PURGED.inc(purged)
                log.info("purged %d expired or used-up secrets", purged)
        if unreadable is not None:
            try:
                await unreadable.refresh()
            except Exception as exc:  # down at start: counted by the first round it answers
                log.warning(
                    "records no configured key can open not counted yet: %s", type(exc).__name__
                )
        await asyncio.sleep(interval)


@dataclass(frozen=True)
class _Services:
    """What the app is built around, made once from the settings."""

    settings: Settings
    keyring: Keyring
    tracer_provider: TracerProvider | None
    store: SecretStore
    writer: AuditWriter | None
    counter: Counter | None
    unreadable: UnreadableRecords
    # The API key table in force, which SIGHUP replaces (empty when API keys are off).
    live_keys: LiveKeys
    # How the audit log and the webhook events name a secret id: its HMAC (one key).
    hash_secret_id: Callable[[str], str]


def _services(settings: Settings, store: SecretStore | None) -> _Services:
    keyring = build_keyring(settings)
    # Tracing first: pymongo reports only to listeners that exist when a client is built.
    tracer_provider = configure_tracing(
        exporter=settings.traces_exporter, service_name=settings.service_name
    )
    store = backend_for(settings).open() if store is None else store
    return _Services(
        settings=settings,
        keyring=keyring,
        tracer_provider=tracer_provider,
        store=store,
        writer=build_audit_writer(settings, store) if settings.audit_enabled else None,
        counter=(
            build_counter(settings)
            if settings.rate_limits or settings.rate_limits_per_key
            else None
        ),
        unreadable=UnreadableRecords(store, keyring.key_ids, settings.retired_key_ids),
        live_keys=LiveKeys(settings.api_keys),
        hash_secret_id=functools.partial(secret_id_hmac, audit_hmac_key(settings)),
    )


def _store_unavailable(
    retry_after: int,
) -> Callable[[Request, Exception], Coroutine[Any, Any, Response]]:
    """The handler of StoreUnavailable: 503 with ``retry_after``, and a log line."""

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        request_id = request_context(request.scope).request_id
        # An outage is logged when the breaker opens and closes, not once per refusal: at
        # request rate those lines would bury everything else in the log.
        level = logging.DEBUG if isinstance(exc, StoreKnownDown) else logging.WARNING
        log.log(level, "store unavailable: %s", exc, extra={"request_id": request_id})
        return unavailable_response(retry_after)

    return store_unavailable


def _denied_for_scope(op: str) -> None:
    ACCESS_DENIED.labels(op=op, reason="scope").inc()


@contextlib.contextmanager
def _keys_reloaded_on_sighup(services: _Services) -> Iterator[None]:
    """While the app runs, SIGHUP re-reads API_KEYS_FILE into the table in force.

    The handler runs on this event loop (between requests' steps, never inside one), and
    the table is swapped whole: requests that start afterwards see the new keys, those in
    flight keep the table they were let in under. Hypercorn's worker installs no SIGHUP
    handler of its own when given a shutdown trigger, as vault/workers.py gives it, and
    its own supervisor (which restarts the workers on SIGHUP) is not used.
    """
    loop = asyncio.get_running_loop()
    reload = functools.partial(reload_key_file, services.live_keys, services.settings.api_keys_file)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        # A SIGHUP sent before the handler was installed (a worker still starting, which
        # ignores the signal until now: vault/workers.py) is not lost: its file is read now.
        reload(quiet=True)
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        # Ignored rather than the default, which would end the process during shutdown.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _lifespan(
    services: _Services, *, reload_on_sighup: bool
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """Open the store and start the background loops (and, in a server process, re-read
    the API keys on SIGHUP); at shutdown flush the audit log before the store closes."""
    settings, store, writer, counter = (
        services.settings,
        services.store,
        services.writer,
        services.counter,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        # Counted before the first request when the store answers at once; one that is down
        # or slow is counted by the purge loop instead: start-up is not held for it.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(FIRST_COUNT_SECONDS):
                await services.unreadable.refresh()
        if isinstance(counter, MongoCounter):
            await counter.open()
        retention = None
        purging = asyncio.create_task(
            _keep_purging(
                store,
                settings.purge_interval_seconds,
                services.unreadable,
                settings.receipt_retention_seconds,
            )
        )
        if writer is not None:
            await writer.start()
            retention = asyncio.create_task(_keep_audit_retention(store, settings.audit_ttl_days))
        # Webhooks, when configured: a task of its own, its own HTTP threads (vault/webhooks.py).
        deliverer = Deliverer.from_settings(
            settings, store, None if writer is None else writer.submit
        )
        if deliverer is not None:
            deliverer.start()
        # What a request that wrote events may wake (``wake()``), to skip the poll's wait.
        app.state.webhooks = deliverer
        try:
            with (
                _keys_reloaded_on_sighup(services) if reload_on_sighup else contextlib.nullcontext()
            ):
                yield
        finally:
            purging.cancel()
            if retention is not None:
                retention.cancel()
            if deliverer is not None:  # settles what it can, before the audit and store go
                await deliverer.stop()
            if writer is not None:
                await writer.close()  # every pending audit record, before the store goes
            if isinstance(counter, MongoCounter):
                await counter.close()
            await store.close()
            shutdown_tracing(services.tracer_provider)

    return lifespan


def _middleware(services: _Services) -> list[Middleware]:
    """The stack, outermost first, each optional layer switched by its own setting:

    - the request id first, so every layer and log line below has it;
    - tracing and metrics next, so they see what the client sees (429s, audit 503s, 500s);
    - security headers on every answer that can come from below;
    - the client IP resolved once, for the audit record and the rate-limit key;
    - audit outside the rate limiter, so refused calls are recorded too;
    - API keys inside both, so refusals are audited and token guessing is rate limited,
      and the per-key rate limit inside the API keys, which tell it the caller's key (a
      second rate-limit layer, counting in the same counter under keys of its own);
    - the error catcher inside them all, so they see a 500 response, never an exception;
    - the body limit innermost, so its refusal signal never reaches the error catcher.
    """
    settings = services.settings
    too_large = (
        f"request body is larger than {settings.max_body_bytes} bytes; "
        f"secrets may be at most {settings.max_secret_bytes} bytes once decoded"
    )
    return [
        *_observing_layers(services),
        *_guarding_layers(services),
        Middleware(InternalErrorMiddleware, retry_after=settings.retry_after_seconds),
        Middleware(
            BodyLimitMiddleware,
            max_body_bytes=settings.max_body_bytes,
            detail=too_large,
            body_timeout=body_deadline(settings.read_timeout_seconds),
        ),
    ]


def _observing_layers(services: _Services) -> list[Middleware]:
    """Request id, tracing, metrics, security headers and the client's address."""
    settings = services.settings
    layers = [Middleware(RequestIdMiddleware)]
    if services.tracer_provider is not None:
        layers.append(Middleware(TracingMiddleware, tracer_provider=services.tracer_provider))
    if settings.metrics_enabled:
        layers.append(Middleware(PrometheusMiddleware))
    return [
        *layers,
        Middleware(SecurityHeadersMiddleware),
        Middleware(ClientIPMiddleware, trusted_proxies=settings.trusted_proxies),
    ]


def _guarding_layers(services: _Services) -> list[Middleware]:
    """Audit, the rate limits and API keys, each when its setting turns it on."""
    settings = services.settings
    layers = []
    # One breaker for the one counter: once a layer finds it down, the other skips it too.
    breaker = CircuitBreaker(retry_after=COUNTER_RETRY_SECONDS)
    if services.writer is not None:
        layers.append(
            Middleware(
                AuditMiddleware,
                sink=services.writer,
                operations=OPERATIONS,
                hash_secret_id=services.hash_secret_id,
                retry_after=settings.retry_after_seconds,
            )
        )
    if services.counter is not None and settings.rate_limits:
        layers.append(
            Middleware(
                RateLimitMiddleware,
                limits=settings.rate_limits,
                counter=services.counter,
                on_limited=RATE_LIMITED.inc,
                breaker=breaker,
            )
        )
    if settings.api_keys or settings.metrics_token_digest is not None:
        layers.append(
            Middleware(
                APIKeyMiddleware,
                keys=services.live_keys,
                operations=OPERATIONS,
                on_denied=_denied_for_scope,
                protected_prefixes=("/vault/",) if settings.api_keys else (),
                metrics_token_digest=settings.metrics_token_digest,
            )
        )
    if services.counter is not None and settings.rate_limits_per_key:
        layers.append(
            Middleware(
                RateLimitMiddleware,
                limits=settings.rate_limits_per_key,
                counter=services.counter,
                per=PER_API_KEY,
                on_limited=RATE_LIMITED.inc,
                breaker=breaker,
            )
        )
    return layers


def create_app(
    settings: Settings | None = None,
    *,
    store: SecretStore | None = None,
    reload_on_sighup: bool = False,
) -> Starlette:
    """Build the ASGI app. With no arguments, everything comes from the environment.

    ``reload_on_sighup``: while the app runs, SIGHUP re-reads API_KEYS_FILE (a server
    process's main thread only: signal handlers can be installed nowhere else).
    """
    settings = Settings.from_env() if settings is None else settings
    services = _services(settings, store)
    api = VaultAPI(
        services.keyring,
        services.store,
        unreadable=services.unreadable,
        max_secret_bytes=settings.max_secret_bytes,
        max_ttl_seconds=settings.max_ttl_seconds,
        default_ttl_seconds=settings.default_ttl_seconds,
        receipt_retention_seconds=settings.receipt_retention_seconds,
        idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
        passphrase_max_attempts=settings.passphrase_max_attempts,
        retry_after=settings.retry_after_seconds,
        hash_secret_id=services.hash_secret_id if settings.emitted_events else None,
    )
    metrics = (
        metrics_app(multiprocess_dir=settings.prometheus_multiproc_dir)
        if settings.metrics_enabled
        else None
    )
    app = Starlette(
        routes=api.routes(
            max_body_bytes=settings.max_body_bytes,
            metrics=metrics,
            api_keys=bool(settings.api_keys),
            metrics_token=settings.metrics_token_digest is not None,
        ),
        middleware=_middleware(services),
        exception_handlers={
            HTTPException: http_error,
            StoreUnavailable: _store_unavailable(settings.retry_after_seconds),
        },
        lifespan=_lifespan(services, reload_on_sighup=reload_on_sighup),
    )
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.store = services.store
    app.state.audit_writer = services.writer
    app.state.live_keys = services.live_keys
    return app


def worker_app(settings: Settings) -> Starlette:
    """What each Hypercorn worker serves, built in that worker from the settings ``serve``
    validated (handed over as a value, never through the environment): logging, the
    server's fixes (in every worker process, where its TCP server runs), which refuse with
    a ConfigError a Hypercorn release they were not written for, and SIGHUP re-reading the
    API keys."""
    configure_logging(settings.log_level)
    hypercorn_fixes.apply()
    return create_app(settings, reload_on_sighup=True)
