"""The service's Prometheus metrics and the ``/metrics`` app that serves them.

Metric objects are module-level constants, as in prometheus_client's own examples. Under
several Hypercorn workers each worker is its own process: prometheus_client then keeps values
in per-process files under ``PROMETHEUS_MULTIPROC_DIR`` and ``metrics_app`` sums them on each
scrape. prometheus_client picks in-memory or file-backed values when it is first imported, so
that variable must be in a worker's environment before anything imports prometheus_client.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_asgi_app,
    multiprocess,
    values,
)
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

# From a cache-speed answer (1 ms) to the slowest a store may take before it times out.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from receiving an HTTP request to the end of its response, by method and route.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
# By method only: the route is known only once the router has run, after the request began.
HTTP_REQUESTS_IN_PROGRESS = Gauge(
    "http_requests_in_progress",
    "HTTP requests being handled now, by method.",
    ["method"],
    multiprocess_mode="livesum",
)
SECRETS_CREATED = Counter(
    "vault_secrets_created_total",
    "Secrets stored successfully.",
)
SECRETS_FETCHED = Counter(
    "vault_secrets_fetched_total",
    "Fetch requests, by outcome (success, not_found, expired, invalid, rate_limited, ...).",
    ["outcome"],
)
SECRETS_DELETED = Counter(
    "vault_secrets_deleted_total",
    "Secrets removed before their time: by a delete request (request), by the fetch that "
    "used their last read (last_read), or by the wrong passphrase that reached the limit "
    "(passphrase).",
    ["reason"],
)
SECRETS_EXPIRED = Counter(
    "vault_secrets_expired_total",
    "Requests that found a secret past its expiry (answered 404), by operation.",
    ["op"],
)
SECRETS_PURGED = Counter(
    "vault_secrets_purged_total",
    "Expired or used-up records removed by the periodic purge.",
)
# No key names or ids as labels: who was refused is in the audit log.
ACCESS_DENIED = Counter(
    "vault_access_denied_total",
    "Requests refused because their API key may not see or do it, by operation and reason "
    "(scope: the key lacks the operation's scope; tenant: the secret is another tenant's; "
    "readers: the secret was made for other readers; passphrase: a fetch without the "
    "secret's passphrase, or with a wrong one).",
    ["op", "reason"],
)
RATE_LIMITED = Counter(
    "vault_rate_limited_total",
    "Requests refused by the rate limiter.",
)
AUDIT_RECORDS = Counter(
    "vault_audit_records_total",
    "Audit records, by result: written to the audit sink, or failed to be written.",
    ["result"],
)
# Set by the stores' write health (vault/stores/health.py); livemin: one worker whose writes
# fail makes the replica read 0, as its /readyz answers 503 then.
STORE_WRITABLE = Gauge(
    "vault_store_writable",
    "0 from a failed store write until a write as large as a create (a create, or the "
    "readiness probe's) succeeds, else 1.",
    multiprocess_mode="livemin",
)
# Every worker counts the same store, so the highest live value is the store's (a sum would
# multiply it). No key id label: the ids are logged, and a count is what an alert needs.
RECORDS_UNREADABLE = Gauge(
    "vault_records_unreadable",
    "Live records no configured key can open: sealed by a key that is not configured "
    "(counted at start and every SECRET_PURGE_INTERVAL_SECONDS), or failing authentication "
    "when read (edited in the database).",
    multiprocess_mode="livemax",
)
NOT_READY = Counter(
    "vault_readyz_not_ready_total",
    "GET /readyz answers of 503, by reason (store unreachable, store refusing writes, disk full).",
    ["reason"],
)
STORE_OPERATION_SECONDS = Histogram(
    "vault_store_operation_seconds",
    "Time the store took per call (insert, get, ping, ...; a batch once), failures included.",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)
STORE_BATCH_SIZE = Histogram(
    "vault_store_batch_size",
    "Records carried by one store call (group commit), by operation (insert, get, insert_audit).",
    ["operation"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

# One breaker per database connection of each worker: 1 while it is open (the store is known
# down and calls are answered 503 at once), 0 when closed; the highest of the live workers.
STORE_BREAKER_OPEN = Gauge(
    "vault_store_breaker_open",
    "1 while calls to the store are refused at once because it is known down, else 0.",
    ["store"],
    multiprocess_mode="livemax",
)
STORE_BREAKER_OPENED = Counter(
    "vault_store_breaker_opened_total",
    "Times the store was found down (a connection-level failure) and its breaker opened.",
    ["store"],
)
STORE_SHORT_CIRCUITED = Counter(
    "vault_store_short_circuited_total",
    "Store calls refused at once, without trying the store, while its breaker was open.",
    ["store"],
)

# Webhooks (vault/webhooks.py). No receiver URL as a label: it may carry a token.
WEBHOOK_DELIVERIES = Counter(
    "vault_webhook_deliveries_total",
    "Webhook deliveries, by event type and result: delivered (a receiver answered 2xx), "
    "failed (an attempt to one receiver that did not; retried later), dropped (an event "
    "past WEBHOOK_MAX_AGE_SECONDS, given up).",
    ["event", "result"],
)
WEBHOOK_DELIVERY_SECONDS = Histogram(
    "vault_webhook_delivery_seconds",
    "Time from the change an event reports to a receiver's 2xx for it, retries included.",
    ["event"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0),
)
# Every worker and replica counts the same outbox: the highest live value is the store's.
WEBHOOK_BACKLOG = Gauge(
    "vault_webhook_backlog",
    "Events in the store's outbox, not yet delivered to every receiver nor dropped.",
    multiprocess_mode="livemax",
)
WEBHOOK_OLDEST_PENDING_SECONDS = Gauge(
    "vault_webhook_oldest_pending_seconds",
    "Age of the oldest event in the outbox (0 when it is empty).",
    multiprocess_mode="livemax",
)


# labels() validates its arguments and takes a lock on every call; the operations are a
# few fixed names, so each one's child is looked up once and kept.
_STORE_OPERATIONS: dict[str, Histogram] = {}


def observe_store_operation(operation: str, seconds: float) -> None:
    """Record how long one store operation (``insert``, ``get``, ``ping``) took."""
    child = _STORE_OPERATIONS.get(operation)
    if child is None:
        child = _STORE_OPERATIONS[operation] = STORE_OPERATION_SECONDS.labels(operation)
    child.observe(seconds)


def prepare_multiprocess_dir(path: Path) -> None:
    """Create the multiprocess directory (0700) and delete the values of earlier runs.

    Files this process itself is writing are kept: when prometheus_client was imported here
    with PROMETHEUS_MULTIPROC_DIR already set, its values live in ``*_<pid>.db`` files that
    are already open, and deleting them would silently lose this process's metrics.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    own_suffix = f"_{os.getpid()}.db"
    writing_here = getattr(values.ValueClass, "_multiprocess", False)
    for stale in path.glob("*.db"):
        if writing_here and stale.name.endswith(own_suffix):
            continue
        stale.unlink(missing_ok=True)


class _MetricsApp:
    """Answers GET and HEAD with the text exposition; a class so ``Route`` treats it as ASGI."""

    def __init__(self, multiprocess_dir: Path | None) -> None:
        self.multiprocess_dir = None if multiprocess_dir is None else str(multiprocess_dir)
        self.single_process = make_asgi_app(registry=REGISTRY)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await WebSocketClose()(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            response = JSONResponse(  # every error of the service is JSON
                {"detail": "use GET to read metrics"},
                status_code=405,
                headers={"Allow": "GET, HEAD"},
            )
            await response(scope, receive, send)
            return
        if self.multiprocess_dir is None:
            await self.single_process(scope, receive, send)
            return
        # A fresh registry per scrape, as prometheus_client's multiprocess docs do: the
        # collector reads every worker's files, those of workers that have exited included.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=self.multiprocess_dir
        )
        await make_asgi_app(registry=registry)(scope, receive, send)


def metrics_app(*, multiprocess_dir: Path | None) -> ASGIApp:
    """The ``/metrics`` ASGI app: every worker's values summed when given their directory.

    Serve it with ``Route("/metrics", metrics_app(...))``: a ``Mount`` only matches
    ``/metrics/`` once slash redirects are off. Content negotiation (OpenMetrics for
    Prometheus), gzip and ``name[]`` filters come from prometheus_client's ``make_asgi_app``.
    """
    return _MetricsApp(multiprocess_dir)
