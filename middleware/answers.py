"""Every error answer the service sends, built in one place: ``{"detail": ...}`` as JSON.

A caller can act on each: the detail says what went wrong and what to do, and an answer
that asks the caller to come back (503, 429) says when, in ``Retry-After``. The layers and
the routes build their refusals here; the app factory hands each the one ``retry_after``.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse

# How long a 503 asks a client to wait before retrying: the store or the audit log is
# down, which its breaker retries every fraction of a second; a few seconds lets it return.
RETRY_AFTER_SECONDS = 5


def error_answer(
    status: int,
    detail: str,
    *,
    retry_after: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error answer: ``{"detail": detail}`` with ``status``, and ``Retry-After`` when
    the caller should retry after that many seconds."""
    fields = dict(headers or {})
    if retry_after is not None:
        fields["Retry-After"] = str(retry_after)
    return JSONResponse({"detail": detail}, status_code=status, headers=fields or None)
