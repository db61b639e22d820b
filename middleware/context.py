"""What the layers and the handlers share about one request, as one typed object.

Each layer fills in what it resolves (the request id, the client address, the caller's key
name) and the handler what only it knows (the operation, the secret id once well formed);
audit, metrics, the rate limiter and the error logger read them from here. The object lives
in the request's ``scope["state"]`` (where Starlette keeps per-request state) under one key
that only this module knows, so no other module writes a string key for it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from starlette.types import Scope

from observability.audit import AuditRecord, AuditWrite

# The servers hand every request a shallow copy of the lifespan state as scope["state"];
# nothing puts a RequestContext in the lifespan state, so each request creates its own.
_STATE_KEY = "secret_manager.request_context"


class AuditRecorder(Protocol):
    """This request's audit layer, for a handler whose store call writes the request's
    audit record itself (one round trip)."""

    def record(self, status: int) -> AuditRecord:
        """This request's record for answering ``status``, made now, on the event loop,
        from what the context holds (the store stamps it again when it decides the answer)."""


class KeyDirectory(Protocol):
    """The API keys a request was let in under (middleware/apikeys.py): a snapshot, so a
    request in flight keeps the keys it started with when the key file is re-read."""

    def names_in(self, tenant: str) -> Collection[str]:
        """The names (without the tenant prefix) of the keys of ``tenant``."""


@dataclass(slots=True)
class RequestContext:
    """One request's shared state; ``None`` until the layer that knows it has run."""

    request_id: str | None = None  # RequestIdMiddleware: the server's own id, never a caller's
    # RequestIdMiddleware: the caller's well-formed X-Request-ID, kept beside the request's
    # id (on its log lines, echoed in the answer), never used as it.
    client_request_id: str | None = None
    client_ip: str | None = None  # ClientIPMiddleware: read it through clientip.client_ip()
    op: str | None = None  # the handler: "create" | "fetch", set before it reads the body
    secret_id: str | None = None  # the handler: the id, only once it is well formed
    # APIKeyMiddleware: the caller's key name within its tenant (``billing`` of
    # ``acme/billing``), never its token; its tenant; and the keys it was let in under.
    # All None when API keys are off (every caller is then the default tenant's).
    api_key_name: str | None = None
    tenant: str | None = None
    keys: KeyDirectory | None = None
    # The handler: a finer outcome of its own 404 than the status tells ("expired": the
    # record is still stored, past its expiry). The caller sees the same 404 either way.
    outcome: str | None = None
    # AuditMiddleware, in sync mode: makes the record a store call may write beside the
    # request's own (one round trip); None when no audit layer waits for its records.
    audit: AuditRecorder | None = None
    # The handler: the audit record its store call wrote (or why it did not), which the
    # audit layer compares with the answer that starts.
    audit_written: AuditWrite | None = None


def request_context(scope: Scope) -> RequestContext:
    """The one RequestContext of this request, created on first use."""
    state: dict[str, object] = scope.setdefault("state", {})
    context = state.get(_STATE_KEY)
    if not isinstance(context, RequestContext):
        context = state[_STATE_KEY] = RequestContext()
    return context
