"""Whether the store takes writes now, as /readyz reports it.

A store reports the outcome of each of its writes here. Pinging alone would call a replica
ready while its disk is full and every create fails; the last write's outcome tells the
truth. When no write has come for a while (a balancer took the replica out, so no traffic
arrives), the store's readiness probe writes one harmless row itself, at most once a second,
so readiness learns that writes work again without waiting for a client.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from observability.metrics import NOT_READY, STORE_WRITABLE
from vault.stores.base import StoreUnavailable

T = TypeVar("T")

# The three reasons /readyz gives an operator, in its body and as the metric label.
UNREACHABLE = "store unreachable"
REFUSING_WRITES = "store refusing writes"
DISK_FULL = "disk full"
REASONS = (UNREACHABLE, REFUSING_WRITES, DISK_FULL)

# The probe writes only when no write outcome is newer than this, and at most this often.
PROBE_INTERVAL_SECONDS = 1.0

for _reason in REASONS:  # every series from the start, so an alert sees its first increase
    NOT_READY.labels(reason=_reason)


class NotReady(StoreUnavailable):
    """What a store's ping raises when the replica is not ready: ``reason``, one of
    REASONS, says why (the last write failed, or the store did not answer)."""

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason, reason=reason)


class WriteHealth:
    """The outcome of the store's last write, and when it was seen.

    One per store (per process); only the event loop touches it, so it needs no lock.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing: str | None = None
        self._seen = -float("inf")  # when the last outcome (either) was recorded
        self._probed = -float("inf")  # when the last probe write was started
        STORE_WRITABLE.set(1)

    @property
    def failing(self) -> str | None:
        """The reason the last write failed, or None when it succeeded (or none was made)."""
        return self._failing

    def succeeded(self) -> None:
        self._failing = None
        self._seen = self._clock()
        STORE_WRITABLE.set(1)

    def failed(self, reason: str) -> None:
        self._failing = reason
        self._seen = self._clock()
        STORE_WRITABLE.set(0)

    def claim_probe(self) -> bool:
        """True when the readiness probe should write now: no write outcome is recent and
        no probe wrote in the last PROBE_INTERVAL_SECONDS. Claiming marks the probe as made,
        so concurrent probes write once."""
        now = self._clock()
        if now - self._seen < PROBE_INTERVAL_SECONDS or now - self._probed < PROBE_INTERVAL_SECONDS:
            return False
        self._probed = now
        return True

    def _failed_with(self, exc: Exception, reason_of: Callable[[Exception], str]) -> None:
        # The reason travels on the error, set where the driver's error was mapped;
        # ``reason_of`` names it for errors that carry none (a timeout, an unexpected one).
        reason = exc.reason if isinstance(exc, StoreUnavailable) else None
        self.failed(reason if reason is not None else reason_of(exc))

    async def track(self, write: Awaitable[T], reason_of: Callable[[Exception], str]) -> T:
        """Await one store write and record its outcome, ``reason_of`` naming the failure
        (one of REASONS). Errors that concern one record alone (a duplicate id) are returned
        by the batch calls, not raised, so only a write failing as a whole counts here."""
        try:
            result = await write
        except Exception as exc:
            self._failed_with(exc, reason_of)
            raise
        self.succeeded()
        return result

    async def track_writes(
        self, call: Awaitable[T], reason_of: Callable[[Exception], str], writing: list[bool]
    ) -> T:
        """``track`` for a call that writes only sometimes (a read carrying audit notes):
        its outcome counts only once it got as far as writing, which its thread says by
        appending to ``writing`` before the write. A pure read says nothing of writes."""
        try:
            result = await call
        except Exception as exc:
            if writing:
                self._failed_with(exc, reason_of)
            raise
        if writing:
            self.succeeded()
        return result

    def raise_if_failing(self) -> None:
        """NotReady when the last write failed: what /readyz answers then."""
        if self._failing is not None:
            raise NotReady(self._failing)
