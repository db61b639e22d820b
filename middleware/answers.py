"""Every error answer the service sends, built in one place: ``{"detail": ...}`` as JSON.

A caller can act on each: the detail says what went wrong and what to do, and an answer
that asks the caller to come back (503, 429) says when, in ``Retry-After``. The layers and
the routes build their refusals here; the app factory hands each the one ``retry_after``.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

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


def _declares_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def refuse_unread(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    """Send a refusal decided before the request's body was read (401, 403, 429).

    Over HTTP/1.x the server closes a connection whose request body it did not read to the
    end, so the refusal of a request that declares a body says ``Connection: close``: a
    client told so opens a new connection for its next request rather than sending it on
    one that is closing (where it would fail without an answer)."""
    if scope.get("http_version") not in ("1.0", "1.1") or not _declares_body(scope):
        await response(scope, receive, send)
        return

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (b"connection", b"close")]
            message = {**message, "headers": headers}
        await send(message)

    await response(scope, receive, closing)
