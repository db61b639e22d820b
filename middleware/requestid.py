"""Give every request an id: the caller's X-Request-ID when well formed, else a new one.

The id is put in the request context for handlers and later middleware, in a context
variable for log lines, and echoed in the X-Request-ID response header.
"""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.context import request_context
from middleware.headers import request_header, set_response_headers
from observability.logging import REQUEST_ID

# Restricted so a caller cannot inject log lines or headers through it.
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp, *, header: str = "X-Request-ID") -> None:
        self.app = app
        self.header = header
        self._name = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        given = request_header(scope, self._name)
        # A new id is 128 random bits in hex, the shape of a UUID's hex without its fixed bits.
        request_id = given if given and _WELL_FORMED.fullmatch(given) else os.urandom(16).hex()
        request_context(scope).request_id = request_id
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                set_response_headers(message, ((self._name, request_id.encode("latin-1")),))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
