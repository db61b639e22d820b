"""The app factory: settings → keyring and store → route table → middleware stack."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from middleware.audit import AuditMiddleware
from middleware.bodylimit import BodyLimitMiddleware
from middleware.errors import InternalErrorMiddleware
from middleware.requestid import RequestIdMiddleware
from middleware.securityheaders import SecurityHeadersMiddleware
from observability.audit import GroupCommitWriter, stdout_stream
from observability.logging import configure_logging
from vault.crypto import Keyring, derive_audit_key, secret_id_hmac
from vault.routes import OPERATIONS, VaultAPI, unavailable_response
from vault.settings import ConfigError, Settings
from vault.stores.base import SecretStore, StoreUnavailable

log = logging.getLogger("secret_manager.app")


def build_keyring(settings: Settings) -> Keyring:
    """The keyring for these settings; ConfigError if no active key is configured."""
    if settings.master_key is None:
        raise ConfigError(
            "MASTER_KEY is not set: set MASTER_KEY or MASTER_KEY_FILE to a key from "
            "`secret-manager genkey`, or run `secret-manager serve --dev` on a laptop"
        )
    return Keyring(settings.master_key, settings.previous_keys)


def build_store(settings: Settings) -> SecretStore:
    """MongoDB when MONGO_URI is set, else the SQLite file under DATA_DIR."""
    if settings.mongo_uri:
        from vault.stores.mongo import MongoStore

        return MongoStore(
            settings.mongo_uri,
            settings.mongo_db,
            write_concern=settings.mongo_write_concern,
            journal=settings.mongo_journal,
            pool_size=settings.mongo_pool_size,
            timeout=settings.store_timeout_seconds,
        )
    from vault.stores.sqlite import SQLiteStore

    return SQLiteStore(settings.data_dir / "vault.db", timeout=settings.store_timeout_seconds)


def audit_hmac_key(settings: Settings) -> bytes:
    """AUDIT_HMAC_KEY, or by default a key derived from the active master key."""
    if settings.audit_hmac_key is not None:
        return settings.audit_hmac_key
    if settings.master_key is None:
        raise ConfigError("MASTER_KEY (or AUDIT_HMAC_KEY) is needed to hash secret ids")
    return derive_audit_key(settings.master_key)


def build_audit_writer(settings: Settings, store: SecretStore) -> GroupCommitWriter:
    """Group commit into the service's own store; its outcomes counted in the metrics."""
    return GroupCommitWriter(
        store.insert_audit,
        wait=settings.audit_mode == "sync",
        stdout=stdout_stream() if settings.audit_stdout else None,
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


def create_app(settings: Settings | None = None, *, store: SecretStore | None = None) -> Starlette:
    """Build the ASGI app. With no arguments, everything comes from the environment."""
    settings = Settings.from_env() if settings is None else settings
    keyring = build_keyring(settings)
    store = build_store(settings) if store is None else store
    api = VaultAPI(keyring, store, max_secret_bytes=settings.max_secret_bytes)
    too_large = (
        f"request body is larger than {settings.max_body_bytes} bytes; "
        f"secrets may be at most {settings.max_secret_bytes} bytes once decoded"
    )

    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):  # pragma: no cover - registered for it only
            raise exc
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("store unavailable: %s", exc, extra={"request_id": request.state.request_id})
        return unavailable_response()

    writer = build_audit_writer(settings, store) if settings.audit_enabled else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        retention = None
        if writer is not None:
            await writer.start()
            retention = asyncio.create_task(_keep_audit_retention(store, settings.audit_ttl_days))
        try:
            yield
        finally:
            if retention is not None:
                retention.cancel()
            if writer is not None:
                await writer.close()  # every pending audit record, before the store goes
            await store.close()

    # Outermost first. The request id comes first so every later layer and log line has
    # it; security headers wrap everything that can answer, the 500 included; the error
    # catcher turns exceptions into a 500 for every layer outside it; the body limit is
    # innermost so its own refusal signal never reaches the error catcher.
    middleware = [
        Middleware(RequestIdMiddleware),
        Middleware(SecurityHeadersMiddleware),
    ]
    if writer is not None:
        audit_key = audit_hmac_key(settings)
        middleware.append(
            Middleware(
                AuditMiddleware,
                sink=writer,
                operations=OPERATIONS,
                hash_secret_id=functools.partial(secret_id_hmac, audit_key),
            )
        )
    middleware += [
        Middleware(InternalErrorMiddleware),
        Middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, detail=too_large),
    ]
    app = Starlette(
        routes=api.routes(max_body_bytes=settings.max_body_bytes),
        middleware=middleware,
        exception_handlers={HTTPException: http_error, StoreUnavailable: store_unavailable},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.store = store
    app.state.audit_writer = writer
    return app


def app_from_environment() -> Starlette:
    """What each Hypercorn worker loads: logging and settings from the environment."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    return create_app(settings)
