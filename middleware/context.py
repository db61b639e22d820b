"""What the layers and the handlers share about one request, as one typed object.

Each layer fills in what it resolves (the request id, the client address, the caller's key
name) and the handler what only it knows (the operation, the secret id once well formed);
audit, metrics, the rate limiter and the error logger read them from here. The object lives
in the request's ``scope["state"]`` (where Starlette keeps per-request state) under one key
that only this module knows, so no other module writes a string key for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from starlette.types import Scope

if TYPE_CHECKING:
    from vault.records import AuditNote

# The servers hand every request a shallow copy of the lifespan state as scope["state"];
# nothing puts a RequestContext in the lifespan state, so each request creates its own.
_STATE_KEY = "secret_manager.request_context"


class AuditDraft(Protocol):
    """This request's audit record before its answer is known (middleware/audit): the
    handler names the status it will answer and hands the note to the store, which writes
    it beside the request's own record, in the same call."""

    def answering(self, status: int) -> AuditNote:
        """The note of answering ``status`` (its outcome read from this context)."""


@dataclass(slots=True)
class RequestContext:
    """One request's shared state; ``None`` until the layer that knows it has run."""

    request_id: str | None = None  # RequestIdMiddleware: the caller's X-Request-ID or a new id
    client_ip: str | None = None  # ClientIPMiddleware: read it through clientip.client_ip()
    op: str | None = None  # the handler: "create" | "fetch", set before it reads the body
    secret_id: str | None = None  # the handler: the id, only once it is well formed
    api_key_name: str | None = None  # APIKeyMiddleware: the caller's key name, never its token
    # The handler: a finer outcome of its own 404 than the status tells ("expired": the
    # record is still stored, past its expiry). The caller sees the same 404 either way.
    outcome: str | None = None
    # AuditMiddleware, in sync mode: the record a store call may write beside the request's
    # own (one round trip); None when no audit layer waits for its records.
    audit: AuditDraft | None = None


def request_context(scope: Scope) -> RequestContext:
    """The one RequestContext of this request, created on first use."""
    state: dict[str, object] = scope.setdefault("state", {})
    context = state.get(_STATE_KEY)
    if not isinstance(context, RequestContext):
        context = state[_STATE_KEY] = RequestContext()
    return context
