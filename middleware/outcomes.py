"""What handlers tell the middleware, and the outcome names shared by audit and metrics.

Handlers record the operation and the secret id in the request scope's state under the keys
below; the outcome is derived from the status alone, so requests refused before a handler
ran (rate limited, body too large) are described the same way as the rest.
"""

from __future__ import annotations

from starlette.types import Scope

OP_KEY = "vault_op"  # "create" | "fetch", set by the handler before it reads the body
API_KEY_NAME_KEY = "api_key_name"  # set by APIKeyMiddleware: the caller's key name, never its token
SECRET_ID_KEY = "vault_secret_id"  # noqa: S105 - a dict key; the id, once well formed

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


def state_of(scope: Scope) -> dict[str, object]:
    """The request's state dict (what ``request.state`` reads and writes)."""
    state: dict[str, object] = scope.setdefault("state", {})
    return state
