"""Audit every ``/vault`` request, and send no answer before its record is written.

The package holds the audit log's three parts: this middleware, the record it builds
(record.py) and the writer that stores it through the store's batched insert (writer.py).

Every path under the prefix is covered: the operations' own, and any other (``op`` is then
``other``), so probing unknown ``/vault`` paths leaves records as well.

The record is built from what the handler put in the request state (operation, secret
id) and what the outer layers resolved (client IP, request id), for the status answered.
Two ways, one guarantee (no answer before its record is durable):

- riding along (sync mode): the middleware puts a draft on the request context; a handler
  whose answer is decided with its store call (a create, a fetch) hands the store
  the draft's note for that status, and the store writes it in the same call, after the
  request's own record (one round trip). When the response starts with that very status
  and the note is stored, it goes out at once; if the store refused the note, the caller
  gets 503 instead (fail closed);
- otherwise (any other route, a refusal, a failure, a status the note does not say), the
  record is built when the response starts and the start is held until the sink accepts
  it; if the sink fails, the caller gets 503 instead and the held response is dropped. A
  503 is not held: it acknowledges nothing, and its record is still written in the
  background.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.answers import RETRY_AFTER_SECONDS, error_answer
from middleware.audit.writer import AuditUnavailable, AuditWriter, stdout_stream
from middleware.clientip import client_ip
from middleware.context import request_context
from middleware.headers import request_header
from middleware.outcomes import outcome_for_status, outcome_of
from observability.audit import AuditRecord

__all__ = [
    "AuditMiddleware",
    "AuditRecord",
    "AuditSink",
    "AuditUnavailable",
    "AuditWriter",
    "stdout_stream",
]

MAX_USER_AGENT = 256
OTHER_OP = "other"  # the op of a path under the prefix that is no operation (404, 405, ...)
AUDIT_UNAVAILABLE = "the audit log is unavailable, so the request was not served; retry later"


class AuditSink(Protocol):
    waits: bool  # sync mode: a request waits for its record (and may hand it to the store)

    async def write(self, record: AuditRecord) -> None:
        """Store the record (or queue it, in async mode); raise if it cannot be taken."""

    def submit(self, record: AuditRecord) -> None:
        """Queue the record without waiting for it."""

    def spill(self, record: AuditRecord) -> None:
        """Log a record the store could not take (a JSON line), so it is not lost."""

    def written_beside(self, record: AuditRecord) -> None:
        """Count (and echo) a record the store wrote beside the request's own."""

    def refused(self, error: Exception) -> None:
        """Count and log a record the store did not write beside the request's own."""


class _Recorder:
    """Makes one request's records (``AuditRecorder`` of middleware/context.py)."""

    __slots__ = ("_audit", "_scope", "_started")

    def __init__(self, audit: AuditMiddleware, scope: Scope, started: float) -> None:
        self._audit = audit
        self._scope = scope
        self._started = started

    def record(self, status: int) -> AuditRecord:
        return self._audit.record(self._scope, status, started=self._started)


class AuditMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        sink: AuditSink,
        operations: Mapping[str, str],
        hash_secret_id: Callable[[str], str],
        prefix: str = "/vault",
        retry_after: int = RETRY_AFTER_SECONDS,
    ) -> None:
        if not operations:
            raise ValueError("operations must map at least one path to an operation")
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must start with '/' and not end with one")
        self.app = app
        self.prefix = prefix
        self._under_prefix = prefix + "/"
        self.sink = sink
        self.operations = dict(operations)
        self.hash_secret_id = hash_secret_id
        self.refusal = error_answer(503, AUDIT_UNAVAILABLE, retry_after=retry_after)

    def record(self, scope: Scope, status: int, *, started: float) -> AuditRecord:
        """This request's record for answering ``status``, from its context as it is now."""
        context = request_context(scope)
        secret_id = context.secret_id
        user_agent = request_header(scope, b"user-agent")
        return AuditRecord(
            ts=dt.datetime.now(dt.UTC),
            op=context.op or self.operations.get(scope["path"], OTHER_OP),
            status=status,
            outcome=outcome_of(scope, status),
            client_ip=client_ip(scope),  # resolved and normalised in one place, clientip.py
            request_id=context.request_id or "",
            secret_id_hmac=self.hash_secret_id(secret_id) if secret_id is not None else None,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            user_agent=user_agent[:MAX_USER_AGENT] if user_agent is not None else None,
            api_key_name=context.api_key_name,
            tenant=context.tenant,
            started=started,
        )

    def _covers(self, path: str) -> bool:
        # Every path under the prefix: a scan of unknown /vault paths leaves a trail too.
        return path in self.operations or path == self.prefix or path.startswith(self._under_prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._covers(scope["path"]):
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        refused = False
        context = request_context(scope)
        if self.sink.waits:
            context.audit = _Recorder(self, scope, started)

        async def refuse(record: AuditRecord) -> None:
            nonlocal refused
            refused = True
            # The trail must say what the caller got: the refusal, not the answer it
            # replaced. The store just failed it, so it goes to the log as a line.
            self.sink.spill(replace(record, status=503, outcome=outcome_for_status(503)))
            await self.refusal(scope, receive, send)

        async def audited_send(message: Message) -> None:
            if refused:
                return  # the app's own answer is dropped: the caller got the 503
            if message["type"] == "http.response.start":
                status = message["status"]
                written = context.audit_written
                if written is not None and written.record.status == status:
                    # Written by the handler's store call beside its own, for this answer.
                    if written.error is None:
                        self.sink.written_beside(written.record)
                        await send(message)
                        return
                    self.sink.refused(written.error)
                    await refuse(written.record)
                    return
                record = self.record(scope, status, started=started)
                if record.status == 503:
                    # Already a refusal: waiting could only turn a 503 into a 503 later
                    # (the store that failed usually holds the audit log too).
                    self.sink.submit(record)
                    await send(message)
                    return
                try:
                    await self.sink.write(record)
                except Exception:
                    await refuse(record)
                    return
            await send(message)

        await self.app(scope, receive, audited_send)
