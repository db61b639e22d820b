"""The outcome names shared by audit and metrics, derived from the response status.

Requests refused before a handler ran (rate limited, body too large) are described from
their status the same way as the rest. A handler may name a finer outcome of its own 4xx
answer in the request context (``expired`` for a 404), which ``outcome_of`` prefers.
What the handlers tell the middleware (operation, secret id) is in middleware/context.py.
"""

from __future__ import annotations

from starlette.types import Scope

from middleware.context import request_context
from observability.audit import outcome_for_status

__all__ = ["outcome_for_status", "outcome_of"]


def outcome_of(scope: Scope, status: int) -> str:
    """The handler's own outcome for its 4xx answer when it named one, else the status's.

    A 5xx (an error after the handler decided, or an audit refusal) is never relabelled.
    """
    named = request_context(scope).outcome
    if named is not None and 400 <= status < 500:
        return named
    return outcome_for_status(status)
