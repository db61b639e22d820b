"""Fixed-window rate limiting, with one or more limits such as 100/s and 3000/min.

Each limit counts a budget's requests in the current window (``time // period``) through a
Counter: in this process (MemoryCounter) or in a database shared by every replica. Whose
budget a request spends is the layer's ``per``: its client's address (PER_CLIENT_IP), or the
API key it was let in under (PER_API_KEY, for a second layer inside the API keys). Both
layers may count in one Counter: their keys never meet. A request over any limit is
answered ``429`` with ``Retry-After`` and never reaches the app; the others get
``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` for the limit nearest to
running out, of this layer's and any rate-limit layer's inside it. If the counter fails (its
database is down), requests are let through: an outage of the rate-limit store must not
become an outage of the vault, nor slow it down, so the middleware is handed a circuit
breaker: after a failure the counter is skipped for the breaker's ``retry_after`` seconds,
then one request tries it again. Every request counts, refused ones included: a client that
keeps sending while refused spends the budgets of its longer windows too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.answers import error_answer, refuse_unread
from middleware.clientip import client_ip
from middleware.context import request_context
from middleware.headers import Pair, set_response_headers
from middleware.paths import UNLIMITED_PATHS, is_exempt

log = logging.getLogger("secret_manager.ratelimit")

WARNING_INTERVAL_SECONDS = 10.0
COUNTER_RETRY_SECONDS = 5.0  # after a counter failure, requests skip it this long
Ticket = TypeVar("Ticket")


class Breaker(Protocol[Ticket]):
    """A circuit breaker for the counter (vault/breaker.py's, handed in by the app)."""

    retry_after: float

    def try_call(self) -> Ticket | None:
        """A ticket to call the counter, or None while it is known down."""

    def succeeded(self, call: Ticket) -> None: ...

    def failed(self, call: Ticket) -> None: ...

    def abandoned(self, call: Ticket) -> None: ...


_UNITS = ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


class Counter(Protocol):
    """Counts hits per key; shared by every replica or local to this process."""

    async def increment(self, key: str, expires_at: float) -> int:
        """Add one to ``key`` and return its new count; the key may be forgotten after
        ``expires_at`` (unix time)."""
        ...

    async def increment_many(self, keys: Sequence[tuple[str, float]]) -> list[int]:
        """``increment`` for each ``(key, expires_at)``, together (one request's windows)."""
        ...


class MemoryCounter:
    """Counts in this process only: each worker process has a limit of its own."""

    def __init__(self, *, purge_interval: float = 60.0) -> None:
        if not purge_interval >= 0:
            raise ValueError("purge_interval must be a number of seconds, at least 0")
        self.purge_interval = purge_interval
        self._counts: dict[str, tuple[int, float]] = {}
        self._next_purge = 0.0

    def __len__(self) -> int:
        """How many keys are held, expired ones not yet purged included."""
        return len(self._counts)

    async def increment(self, key: str, expires_at: float) -> int:
        # No await between read and write: atomic on the event loop without a lock.
        now = time.time()
        if now >= self._next_purge:
            self._counts = {k: v for k, v in self._counts.items() if v[1] >= now}
            self._next_purge = now + self.purge_interval
        count, expiry = self._counts.get(key, (0, expires_at))
        if expiry < now:
            count = 0
        self._counts[key] = (count + 1, expires_at)
        return count + 1

    async def increment_many(self, keys: Sequence[tuple[str, float]]) -> list[int]:
        return [await self.increment(key, expires_at) for key, expires_at in keys]


@dataclass(frozen=True)
class Budgets:
    """Whose budget a rate-limit layer counts each request against."""

    # The request's budget, the start of its counter keys; None: not counted by this layer.
    of: Callable[[Scope], str | None]
    # How a 429 names that budget: "at most 3 requests per hour <whose>".
    whose: str


def _api_key_budget(scope: Scope) -> str | None:
    """``key:<tenant>/<name>`` of the key the request was let in under, or None (no key:
    API keys are off, or the path needs none). Tenant and name are percent-encoded, so
    neither can hold the ``/`` or ``:`` that separate them; no tenant (None) is the default
    tenant's, as the empty text, which no named tenant encodes to. Never the token."""
    context = request_context(scope)
    if context.api_key_name is None:
        return None
    tenant = quote(context.tenant or "", safe="")
    return f"key:{tenant}/{quote(context.api_key_name, safe='')}"


# The client's address itself, as the counter keys have always begun, so counts already in
# a shared store stay valid across an upgrade. It is an IP address (or the server's name for
# a peer without one), never text a caller chose, so it never starts with "key:" ("k" and
# "y" are no hex digits): no client shares a budget with an API key.
PER_CLIENT_IP = Budgets(client_ip, "from one client")
PER_API_KEY = Budgets(_api_key_budget, "for this API key")


def _per(period: int) -> str:
    """60 → "minute", 120 → "2 minutes", 90 → "90 seconds"."""
    seconds, unit = next((s, u) for s, u in _UNITS if period % s == 0)  # 1 divides any period
    n = period // seconds
    return unit if n == 1 else f"{n} {unit}s"


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a setattr per field
class _Usage:
    """One limit's state for this budget: how many requests its window has seen."""

    limit: int
    count: int
    reset: int  # whole seconds until the window ends, at least 1
    detail: str
    period: int

    @property
    def remaining(self) -> int:
        return max(self.limit - self.count, 0)

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }

    def pairs(self) -> tuple[Pair, ...]:
        """``headers()`` as an ASGI message carries them, encoded without a dict between."""
        return (
            (b"ratelimit-limit", b"%d" % self.limit),
            (b"ratelimit-remaining", b"%d" % self.remaining),
            (b"ratelimit-reset", b"%d" % self.reset),
        )

    def nearer_than(self, message: Message) -> bool:
        """Whether this limit is nearer to running out than the one whose headers a layer
        inside already put in ``message`` (True when there are none): fewer requests
        remaining, or as few and a later reset, as one layer chooses among its limits."""
        remaining = reset = None
        for name, value in message.get("headers", ()):
            if name == b"ratelimit-remaining":
                remaining = value
            elif name == b"ratelimit-reset":
                reset = value
        if remaining is None or reset is None or not (remaining.isdigit() and reset.isdigit()):
            return True
        return (self.remaining, -self.reset) < (int(remaining), -int(reset))


def _nearness(usage: _Usage) -> tuple[int, int]:
    """Sorts the limit nearest to running out first: fewest remaining, then latest reset."""
    return (usage.remaining, -usage.reset)


class RateLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: Sequence[tuple[int, int]],
        counter: Counter,
        per: Budgets = PER_CLIENT_IP,
        exempt_paths: Collection[str] = UNLIMITED_PATHS,
        on_limited: Callable[[], None] | None = None,
        breaker: Breaker[Any] | None = None,
    ) -> None:
        limits = tuple(limits)
        if not limits:
            raise ValueError(
                "limits is empty: give at least one (max requests, period seconds) pair, "
                "or leave RateLimitMiddleware out of the stack to turn rate limiting off"
            )
        for limit in limits:
            if len(limit) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in limit
            ):
                raise ValueError(
                    f"each limit must be (max requests, period seconds) with positive whole "
                    f"numbers, like (100, 1); got {limit!r}"
                )
        periods = [period for _, period in limits]
        if len(set(periods)) != len(periods):
            # Both would count under the same key, so each request would count twice.
            raise ValueError(f"two limits share a period; keep the smaller of them: {limits!r}")
        self.app = app
        self.limits = limits
        self.counter = counter
        self.budget_of = per.of
        self.exempt_paths = frozenset(exempt_paths)
        self.on_limited = on_limited
        self._details = {
            (limit, period): (
                f"rate limit exceeded: at most {limit} request{'s' if limit != 1 else ''} "
                f"per {_per(period)} {per.whose}; retry after "
            )
            for limit, period in limits
        }
        # Shared by every request on purpose: it throttles the outage warning.
        self._next_warning = 0.0
        self._unlogged_failures = 0
        # After a failure the counter is left alone for a while (the breaker): each call to
        # a database that is down costs its whole timeout, and every request would pay it.
        # Then one request tries it again while the others still go through. Without one
        # (a counter that cannot fail, as in-process counting), every request counts.
        self._breaker = breaker

    async def _usage(self, budget: str) -> list[_Usage]:
        now = time.time()
        windows = [(period, int(now // period)) for _, period in self.limits]
        keys = [
            (f"{budget}:{period}:{window}", (window + 1) * period) for period, window in windows
        ]
        counts = await self.counter.increment_many(keys)
        return [
            _Usage(
                limit, count, max(math.ceil(ends - now), 1), self._details[limit, period], period
            )
            for (limit, period), (_, ends), count in zip(self.limits, keys, counts, strict=True)
        ]

    def _counter_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if now < self._next_warning:
            self._unlogged_failures += 1
            return
        # Only the error type: a counter's message may carry its key, and the key holds
        # the client's address or the caller's key name.
        log.warning(
            "rate limit counter failed (%s); letting requests through unlimited, trying it "
            "again every %g s (%d more failures since the last warning)",
            type(exc).__name__,
            self._breaker.retry_after if self._breaker is not None else 0,
            self._unlogged_failures,
        )
        self._next_warning = now + WARNING_INTERVAL_SECONDS
        self._unlogged_failures = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope, self.exempt_paths):
            await self.app(scope, receive, send)
            return
        budget = self.budget_of(scope)
        if budget is None:
            await self.app(scope, receive, send)
            return

        breaker = self._breaker
        call = None if breaker is None else breaker.try_call()
        if breaker is not None and call is None:
            await self.app(scope, receive, send)  # the counter is down: fail open at once
            return
        try:
            usage = await self._usage(budget)
        except Exception as exc:  # any counter failure: fail open, never fail the request
            if breaker is not None:
                breaker.failed(call)
            self._counter_failed(exc)
            await self.app(scope, receive, send)
            return
        except BaseException:
            if breaker is not None:
                breaker.abandoned(call)
            raise
        if breaker is not None:
            breaker.succeeded(call)

        exceeded = [u for u in usage if u.count > u.limit]
        if exceeded:
            # The longest wait; of limits whose windows end together (the last hour of a
            # day), the longest period, which is the one a caller must plan around.
            worst = max(exceeded, key=lambda u: (u.reset, u.period))
            response = error_answer(
                429,
                f"{worst.detail}{worst.reset} s",
                retry_after=worst.reset,
                headers=worst.headers(),
            )
            if self.on_limited is not None:
                self.on_limited()
            await refuse_unread(response, scope, receive, send)
            return

        nearest = usage[0] if len(usage) == 1 else min(usage, key=_nearness)
        pairs = nearest.pairs()

        async def send_with_headers(message: Message) -> None:
            # A layer inside (the per-key limit inside the per-client one) may have set
            # its own, nearer limit's headers, its 429's among them: those stay.
            if message["type"] == "http.response.start" and nearest.nearer_than(message):
                set_response_headers(message, pairs)
            await send(message)

        await self.app(scope, receive, send_with_headers)
