"""The audit record: what one ``/vault`` request leaves in the audit log, and its outcomes.

The audit middleware makes a record; the writer or the request's own store call stores it.
It lives here, in the bottom layer, so that the middleware and the stores name the same
type without importing each other. It imports nothing but the standard library: no
database driver (a record's id is made here, not by bson), no Prometheus.

A record never holds a secret, and names the secret id only by its HMAC.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

# The fields of a record, in the order the stores keep them; what ``as_document`` returns.
AUDIT_FIELDS = (
    "ts",
    "op",
    "status",
    "outcome",
    "client_ip",
    "request_id",
    "secret_id_hmac",
    "latency_ms",
    "user_agent",
    "api_key_name",
    "record_id",
    "tenant",
)

# The outcome of an answer, by its status: the names shared by the audit log and the
# metrics. A handler may name a finer outcome of its own 4xx (``expired`` for a 404).
_BY_STATUS = {
    200: "success",
    400: "invalid",
    401: "unauthorized",
    403: "denied",  # access control: the key may not do this, or not to this secret
    404: "not_found",
    405: "invalid",  # a method the path does not take: the caller's mistake, not ours
    408: "invalid",
    413: "too_large",
    415: "invalid",
    429: "rate_limited",
    503: "unavailable",
}


def outcome_for_status(status: int) -> str:
    """``success``, ``invalid``, ``not_found``, ... or ``error`` for anything unexpected."""
    return _BY_STATUS.get(status, "error")


def new_record_id() -> str:
    """24 hex digits, time-ordered to the second then random: the shape of a MongoDB
    ObjectId (a MongoDB store uses it as the ``_id``), made without a database driver."""
    return f"{int(time.time()) & 0xFFFFFFFF:08x}{os.urandom(8).hex()}"  # token_hex(8), inlined


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
    api_key_name: str | None = None  # the key's name within its tenant
    # Fixed when the record is made, so writing it again (a retry after a timeout whose
    # first attempt landed after all) finds it stored instead of storing it twice.
    record_id: str = field(default_factory=new_record_id)
    # When the request started (time.perf_counter), so that a record made before the
    # answer is known can be stamped when it is written (``answered``). Not stored.
    started: float = field(default=0.0, compare=False, repr=False)
    tenant: str | None = None  # the key's tenant; None when API keys are off

    def answered(self, status: int, outcome: str | None = None) -> AuditRecord:
        """This record for the answer ``status`` (``outcome`` when finer than the status's),
        stamped now: its time and latency are those of the moment the answer was decided."""
        # Every field named, not dataclasses.replace: that introspects the fields on each
        # call, twice the cost of this, and every sync-mode store call stamps its records.
        return AuditRecord(
            ts=dt.datetime.now(dt.UTC),
            op=self.op,
            status=status,
            outcome=outcome or outcome_for_status(status),
            client_ip=self.client_ip,
            request_id=self.request_id,
            secret_id_hmac=self.secret_id_hmac,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            user_agent=self.user_agent,
            api_key_name=self.api_key_name,
            record_id=self.record_id,
            started=self.started,
            tenant=self.tenant,
        )

    def as_document(self) -> dict[str, Any]:
        """Every stored field (``AUDIT_FIELDS``), record_id included."""
        # Shallow on purpose: every field is immutable, and dataclasses.asdict deep-copies
        # each one (measured at about a tenth of a request's CPU in the audit path).
        return {name: getattr(self, name) for name in AUDIT_FIELDS}

    def as_json(self) -> str:
        """One JSON line (UTC timestamp with a ``Z``), for AUDIT_STDOUT and the log."""
        document = self.as_document()
        document["ts"] = self.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class AuditWrite:
    """An audit record a store call wrote beside the request's own record (stamped for the
    answer it records), or, with ``error``, why it was not written: what the handler tells
    the audit layer on the request context."""

    record: AuditRecord
    error: Exception | None = None
