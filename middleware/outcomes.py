"""The outcome names shared by audit and metrics, derived from the response status alone.

An outcome is not per-request state a layer sets: requests refused before a handler ran
(rate limited, body too large) are described from their status the same way as the rest.
What the handlers tell the middleware (operation, secret id) is in middleware/context.py.
"""

from __future__ import annotations

_BY_STATUS = {
    200: "success",
    400: "invalid",
    401: "unauthorized",
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
