"""Whether the store takes writes now, as /readyz reports it.

A store reports its writes here. Pinging alone would call a replica ready while its disk is
full and every create fails; writes tell the truth. Any failed write makes the replica not
ready at once. Only a write at least as large as a create makes it ready again: a create
that stored its record, or the readiness probe's write of equal standing. A smaller write
(an audit record, a read taken, the refused create's own audit record) can land in pages a
refused create left allocated, so its success proves nothing about the next create.

When no write has told anything for a while (a balancer took the replica out, so no traffic
arrives), the store's readiness probe writes itself, at most once a second: one small row
while writes work (enough to notice a failure), and as much as the largest create while
they fail (what it takes to show they work again).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from observability.metrics import NOT_READY, STORE_WRITABLE
from vault.errors import NotReady, StoreUnavailable

T = TypeVar("T")

# The three reasons /readyz gives an operator, in its body and as the metric label.
UNREACHABLE = "store unreachable"
REFUSING_WRITES = "store refusing writes"
DISK_FULL = "disk full"
REASONS = (UNREACHABLE, REFUSING_WRITES, DISK_FULL)

# The probe writes only when no write has told anything for this long, and at most this often.
PROBE_INTERVAL_SECONDS = 1.0

for _reason in REASONS:  # every series from the start, so an alert sees its first increase
    NOT_READY.labels(reason=_reason)


def stored_any(results: Sequence[object]) -> bool:
    """Whether a batch insert stored a record (an item's result that is no exception), the
    only way it proves writes work: a batch whose every record was refused alone (a
    duplicate id) may have written nothing."""
    return any(not isinstance(result, Exception) for result in results)


class WriteHealth:
    """Whether writes fail, since when, and when the probe last wrote.

    One per store (per process); only the event loop touches it, so it needs no lock.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing: str | None = None
        self._seen = -float("inf")  # when a write last told anything: failed, or proved
        self._probed = -float("inf")  # when the last probe write was started
        STORE_WRITABLE.set(1)

    @property
    def failing(self) -> str | None:
        """Why writes fail (the reason of the last failure), or None when none failed since
        the last write that proved they work (or none was made)."""
        return self._failing

    def succeeded(self) -> None:
        """A write at least as large as a create succeeded: writes work."""
        self._failing = None
        self._seen = self._clock()
        STORE_WRITABLE.set(1)

    def failed(self, reason: str) -> None:
        """A write failed (any write, however small): not ready from now on."""
        self._failing = reason
        self._seen = self._clock()
        STORE_WRITABLE.set(0)

    def claim_probe(self) -> bool:
        """True when the readiness probe should write now: no write failed or proved
        anything recently, and no probe wrote in the last PROBE_INTERVAL_SECONDS. Claiming
        marks the probe as made, so concurrent probes write once."""
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

    async def track(
        self,
        write: Awaitable[T],
        reason_of: Callable[[Exception], str],
        *,
        proves: bool | Callable[[T], bool] = False,
    ) -> T:
        """Await one store write and record its outcome: a failure always, a success only
        when ``proves`` says it shows writes work (True, or a test of the result). Errors
        that concern one record alone (a duplicate id) are returned by the batch calls, not
        raised, so only a write failing as a whole counts as failed."""
        try:
            result = await write
        except Exception as exc:
            self._failed_with(exc, reason_of)
            raise
        if proves is True or (callable(proves) and proves(result)):
            self.succeeded()
        return result

    async def track_writes(
        self, call: Awaitable[T], reason_of: Callable[[Exception], str], *, writes: bool
    ) -> T:
        """``track`` for a call that writes only sometimes, and little (a batch of fetches:
        the reads it takes, the audit records it carries): its failure counts when it
        ``writes`` audit records, which its caller knows before sending it (one that
        carries none, audit off, counts as a read). Its success proves nothing: those few
        pages may fit where a create's do not."""
        if writes:
            return await self.track(call, reason_of)
        return await call

    def raise_if_failing(self) -> None:
        """NotReady while writes fail: what /readyz answers then."""
        if self._failing is not None:
            raise NotReady(self._failing)
