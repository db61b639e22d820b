"""The audit record, and a group-commit writer that makes each one durable before its answer.

Records of concurrent requests are batched into one store insert: while one batch is being
written, the next accumulates, so the cost per request falls as load rises and no timer adds
latency when the service is idle. In ``sync`` mode each request waits for its batch; in
``async`` mode it does not, and ``close()`` (run at shutdown) still writes every pending
record. A record the store refused is logged as a JSON line instead of being dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

from bson import ObjectId

log = logging.getLogger("secret_manager.audit")

MAX_PENDING_ASYNC = 100_000  # async mode's bound on records waiting for a store that is down


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One ``/vault`` request. Never holds a secret, and the secret id only as an HMAC."""

    ts: dt.datetime
    op: str
    status: int
    outcome: str
    client_ip: str
    request_id: str
    secret_id_hmac: str | None
    latency_ms: float
    user_agent: str | None
    api_key_name: str | None = None
    # Fixed when the record is made, so writing it again (a retry after a timeout whose
    # first attempt landed after all) finds it stored instead of storing it twice. An
    # ObjectId's hex: MongoDB's _id of the record, in time order.
    record_id: str = field(default_factory=lambda: str(ObjectId()))

    def as_document(self) -> dict[str, Any]:
        """The fields as stored; the record_id is the store's key, not among them."""
        # Shallow on purpose: every field is immutable, and dataclasses.asdict deep-copies
        # each one (measured at about a tenth of a request's CPU in the audit path).
        return {name: getattr(self, name) for name in _FIELDS}

    def as_json(self) -> str:
        document = self.as_document()
        document["ts"] = self.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        document["record_id"] = self.record_id
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


_FIELDS = tuple(f.name for f in fields(AuditRecord) if f.name != "record_id")


class AuditUnavailable(Exception):
    """The audit store did not take the record; the request must not be acknowledged."""


# One entry per record: None once it is stored (now, or by an earlier attempt), else the
# error that record alone failed with and will fail with again (a unique index it breaks,
# a validator): it is not retried. A failure of the whole call raises instead.
Insert = Callable[[Sequence[AuditRecord]], Awaitable[Sequence[Exception | None]]]


def _noop(count: int) -> None:
    return None


class GroupCommitWriter:
    """Batches records into one ``insert`` call; see the module docstring."""

    def __init__(
        self,
        insert: Insert,
        *,
        wait: bool = True,
        max_batch: int = 512,
        stdout: TextIO | None = None,
        on_written: Callable[[int], None] = _noop,
        on_failed: Callable[[int], None] = _noop,
        retry_delay: float = 1.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        self._insert = insert
        self._wait = wait
        self._max_batch = max_batch
        self._stdout = stdout
        self._on_written = on_written
        self._on_failed = on_failed
        self._retry_delay = retry_delay
        self._pending: list[tuple[AuditRecord, asyncio.Future[None] | None]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0  # batches committed: lets tests and operators see the grouping

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(self._wakeup), name="audit-group-commit")

    async def write(self, record: AuditRecord) -> None:
        """Queue a record; in sync mode return once it is durably stored."""
        if self._wakeup is None or self._closing:
            raise AuditUnavailable("audit writer is not running")
        future = asyncio.get_running_loop().create_future() if self._wait else None
        self._pending.append((record, future))
        self._wakeup.set()
        if future is not None:
            await future

    def submit(self, record: AuditRecord) -> None:
        """Queue a record without waiting for it (for answers that acknowledge nothing)."""
        if self._wakeup is None or self._closing:
            self._spill([record], "audit writer is not running")
            return
        self._pending.append((record, None))
        self._wakeup.set()

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
        if self._pending:
            self._spill([record for record, _ in self._pending], "shutting down")
            self._pending.clear()

    async def _run(self, wakeup: asyncio.Event) -> None:
        while True:
            await wakeup.wait()
            wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: len(batch)]
                stored = await self._commit(batch)
                if not stored and not self._wait:
                    # Async mode keeps the records and retries: nobody is waiting on them.
                    self._pending[:0] = batch
                    del self._pending[MAX_PENDING_ASYNC:]
                    if self._closing:
                        return
                    await asyncio.sleep(self._retry_delay)
            if self._closing:
                return

    async def _commit(self, batch: list[tuple[AuditRecord, asyncio.Future[None] | None]]) -> bool:
        records = [record for record, _ in batch]
        try:
            errors = await self._insert(records)
        except Exception as exc:  # any store failure: the requests must not be acknowledged
            self._on_failed(len(records))
            log.error(
                "audit store refused a batch of %d records: %s", len(records), type(exc).__name__
            )
            if self._wait:
                # Records someone waits on are refused to their callers, who log that refusal
                # instead (AuditMiddleware); the rest go to the log, not nowhere.
                self._spill([record for record, future in batch if future is None], "store failed")
            failure = AuditUnavailable(type(exc).__name__)
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_exception(failure)
            return False
        self.batches += 1
        stored = [record for record, error in zip(records, errors, strict=True) if error is None]
        self._on_written(len(stored))
        if len(stored) < len(records):
            self._refuse_alone(batch, errors)
        if self._stdout is not None and stored:
            with contextlib.suppress(OSError, ValueError):
                self._stdout.write("".join(record.as_json() + "\n" for record in stored))
                self._stdout.flush()
        for (_, future), error in zip(batch, errors, strict=True):
            if future is not None and not future.done() and error is None:
                future.set_result(None)
        return True

    def _refuse_alone(
        self,
        batch: list[tuple[AuditRecord, asyncio.Future[None] | None]],
        errors: Sequence[Exception | None],
    ) -> None:
        """Records the store refused one by one: never retried (they would block every
        record behind them), refused to their waiting callers, or else logged."""
        failed = [(entry, error) for entry, error in zip(batch, errors, strict=True) if error]
        self._on_failed(len(failed))
        log.error(
            "audit store refused %d records of a batch: %s",
            len(failed),
            ", ".join(sorted({type(error).__name__ for _, error in failed})),
        )
        for (record, future), error in failed:
            if future is None:
                self._spill([record], "refused by the store")
            elif not future.done():
                future.set_exception(AuditUnavailable(type(error).__name__))

    def spill(self, record: AuditRecord) -> None:
        """Log a record the store did not take, as a JSON line, instead of dropping it."""
        self._spill([record], "store failed")

    @staticmethod
    def _spill(records: Sequence[AuditRecord], why: str) -> None:
        for record in records:
            log.error("audit record not stored (%s): %s", why, record.as_json())


def stdout_stream() -> TextIO:
    """Where AUDIT_STDOUT writes: the process's standard output."""
    return sys.stdout
