"""The audit record: what one ``/vault`` request leaves in the audit log.

It never holds a secret, and the secret id only as an HMAC. ``as_document`` is the plain
mapping the store's audit insert takes (its shape is fixed at the store level, see
``AUDIT_FIELDS`` in vault/stores/base.py), so a store never imports this module.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, fields
from typing import Any

from bson import ObjectId


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
        """Every field, record_id included: what the store's audit insert takes."""
        # Shallow on purpose: every field is immutable, and dataclasses.asdict deep-copies
        # each one (measured at about a tenth of a request's CPU in the audit path).
        return {name: getattr(self, name) for name in _FIELDS}

    def as_json(self) -> str:
        """One JSON line (UTC timestamp with a ``Z``), for AUDIT_STDOUT and the log."""
        document = self.as_document()
        document["ts"] = self.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


_FIELDS = tuple(f.name for f in fields(AuditRecord))
