"""The audit writer: makes each record durable before its answer, or keeps it until it is.

The writer is handed the store's audit insert through its constructor (a middleware never
imports a store). It has no batching of its own: the store groups concurrent inserts into
one database call (group commit, vault/stores/batching.py), as it does for secrets, so the
cost per record falls as load rises and no timer adds latency when the service is idle.

In ``sync`` mode a request waits until its record is stored, and a failure reaches the
middleware, which answers 503. In ``async`` mode nobody waits: records queue, are retried
while the store is down (up to ``max_pending`` of them), and ``close()`` (run at shutdown)
writes what is still pending. A record the store refused alone is never retried (it would
fail again and hold up the records behind it); like anything else the store would not
take, it goes to the log as a JSON line instead of being dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TextIO

from observability.audit import AuditRecord

log = logging.getLogger("secret_manager.audit")

MAX_PENDING_ASYNC = 100_000  # async mode's bound on records waiting for a store that is down
# Records handed to the store at once from the queue: a backlog left by an outage goes out
# in slices the store writes within its time budget, instead of all at once and timing out.
MAX_IN_FLIGHT = 1024


class AuditUnavailable(Exception):
    """The audit store did not take the record; the request must not be acknowledged."""


# The store's audit insert: one record. Returns None
# once it is stored (now, or by an earlier attempt), or the error this record alone failed
# with and would fail with again (a unique index it breaks). Raises when the store did not
# take the call as a whole (down, timed out): that is worth retrying.
AuditInsert = Callable[[AuditRecord], Awaitable[Exception | None]]


def _noop(count: int) -> None:
    return None


def _names(errors: Iterable[BaseException]) -> str:
    return ", ".join(sorted({type(error).__name__ for error in errors}))


class AuditWriter:
    """Writes audit records through the store's insert; see the module docstring."""

    def __init__(
        self,
        insert: AuditInsert,
        *,
        wait: bool = True,
        stdout: TextIO | None = None,
        on_written: Callable[[int], None] = _noop,
        on_failed: Callable[[int], None] = _noop,
        retry_delay: float = 1.0,
        max_pending: int = MAX_PENDING_ASYNC,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        if max_pending < 1 or max_in_flight < 1:
            raise ValueError("max_pending and max_in_flight must be at least 1")
        if retry_delay < 0:
            raise ValueError("retry_delay must not be negative")
        self._insert = insert
        # Sync mode: a request waits for its record (so the middleware may hand that record
        # to the request's own store call instead).
        self.waits = wait
        self._stdout = stdout
        self._on_written = on_written
        self._on_failed = on_failed
        self._retry_delay = retry_delay
        self._max_pending = max_pending
        self._max_in_flight = max_in_flight
        self._queue: deque[AuditRecord] = deque()  # nobody waits on these
        self._sending = 0  # taken from the queue, not yet stored or given up
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(self._wakeup), name="audit-writer")

    async def write(self, record: AuditRecord) -> None:
        """In sync mode return once the record is durably stored, else raise
        AuditUnavailable; in async mode queue it and return at once."""
        if self._wakeup is None or self._closing:
            raise AuditUnavailable("audit writer is not running")
        if not self.waits:
            self._enqueue(record)
            return
        try:
            error = await self._insert_one(record)
        except AuditUnavailable as exc:
            self._on_failed(1)
            log.error("audit store did not take a record: %s", exc)
            raise
        if error is not None:
            self.refused(error)
            raise AuditUnavailable(type(error).__name__)
        self._count_written([record])

    def submit(self, record: AuditRecord) -> None:
        """Queue a record without waiting for it (for answers that acknowledge nothing)."""
        if self._wakeup is None or self._closing:
            self._spill([record], "audit writer is not running")
            return
        self._enqueue(record)

    def spill(self, record: AuditRecord) -> None:
        """Log a record the store did not take, as a JSON line, instead of dropping it."""
        self._spill([record], "store failed")

    def written_beside(self, record: AuditRecord) -> None:
        """Count (and echo) a record the store wrote beside a request's own, as ``write``
        does for the records it stores itself."""
        self._count_written([record])

    def refused(self, error: Exception) -> None:
        """Count and log a record the store did not write beside a request's own (the
        middleware spills it, as the 503 the caller gets instead)."""
        self._on_failed(1)
        log.error("audit store refused a record: %s", type(error).__name__)

    async def close(self) -> None:
        """Write everything still pending, then stop. Safe to call twice."""
        if self._task is None or self._wakeup is None:
            return
        self._closing = True
        self._wakeup.set()
        try:
            await self._task
        finally:
            self._task = None
        # Whatever could not be stored even now goes to the log rather than nowhere.
        if self._queue:
            self._spill(self._queue, "shutting down")
            self._queue.clear()

    def _enqueue(self, record: AuditRecord) -> None:
        if len(self._queue) + self._sending >= self._max_pending:
            self._spill([record], "too many records waiting for the store")
            return
        self._queue.append(record)
        if self._wakeup is not None:
            self._wakeup.set()

    async def _insert_one(self, record: AuditRecord) -> Exception | None:
        """None once stored, or the record's own refusal; AuditUnavailable when the store
        did not take the call as a whole."""
        try:
            return await self._insert(record)
        except Exception as exc:  # any store failure: nothing may be acknowledged
            raise AuditUnavailable(type(exc).__name__) from exc

    async def _run(self, wakeup: asyncio.Event) -> None:
        while True:
            await wakeup.wait()
            wakeup.clear()
            while self._queue:
                count = min(len(self._queue), self._max_in_flight)
                records = [self._queue.popleft() for _ in range(count)]
                self._sending = count
                try:
                    unsent = await self._send(records)
                finally:
                    self._sending = 0
                if not unsent:
                    continue
                if self.waits:
                    # Sync mode queues only answers that acknowledged nothing (503s): they
                    # go to the log at once, as the waiting requests' refusals do.
                    self._spill(unsent, "store failed")
                    continue
                # Async mode keeps them, oldest first, and retries: nobody waits on them.
                self._queue.extendleft(reversed(unsent))
                if self._closing:
                    return
                await asyncio.sleep(self._retry_delay)
            if self._closing:
                return

    async def _send(self, records: list[AuditRecord]) -> list[AuditRecord]:
        """Hand the records to the store at once (it groups them into as few calls as it
        can); return those it did not take as a whole, to retry."""
        results = await asyncio.gather(
            *(self._insert_one(record) for record in records), return_exceptions=True
        )
        stored: list[AuditRecord] = []
        refused: list[tuple[AuditRecord, BaseException]] = []
        unsent: list[tuple[AuditRecord, BaseException]] = []
        for record, result in zip(records, results, strict=True):
            if result is None:
                stored.append(record)
            elif isinstance(result, AuditUnavailable) or not isinstance(result, Exception):
                unsent.append((record, result))  # the call failed, or was cancelled: retry
            else:
                refused.append((record, result))
        if stored:
            self._count_written(stored)
        if refused:
            self._on_failed(len(refused))
            log.error(
                "audit store refused %d records: %s",
                len(refused),
                _names(error for _, error in refused),
            )
            self._spill([record for record, _ in refused], "refused by the store")
        if unsent:
            self._on_failed(len(unsent))
            log.error(
                "audit store did not take %d records: %s",
                len(unsent),
                _names(error.__cause__ or error for _, error in unsent),
            )
        return [record for record, _ in unsent]

    def _count_written(self, records: list[AuditRecord]) -> None:
        self._on_written(len(records))
        if self._stdout is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stdout.write("".join(record.as_json() + "\n" for record in records))
                self._stdout.flush()

    @staticmethod
    def _spill(records: Iterable[AuditRecord], why: str) -> None:
        for record in records:
            log.error("audit record not stored (%s): %s", why, record.as_json())


def stdout_stream() -> TextIO:
    """Where AUDIT_STDOUT writes: the process's standard output."""
    return sys.stdout
