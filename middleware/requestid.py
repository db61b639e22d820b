"""Give every request an id of the server's own, and keep a caller's X-Request-ID beside it.

The request's id is always made here (128 random bits in hex): no caller chooses it, so no
two requests share one in the logs, the traces or the audit trail. It goes in the request
context for handlers and later middleware, in a context variable for log lines, and out in
the ``X-Server-Request-ID`` response header. A caller's well-formed ``X-Request-ID`` is
kept beside it (``client_request_id``: on the request's log lines, never its id) and echoed
in the ``X-Request-ID`` response header, so a client correlating by its own id still can;
a caller that sends none (or a malformed one) gets the server's id there instead.
"""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.context import request_context
from middleware.headers import request_header, set_response_headers
from observability.logging import CLIENT_REQUEST_ID, REQUEST_ID

# Restricted so a caller cannot inject log lines or headers through it.
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        header: str = "X-Request-ID",
        server_header: str = "X-Server-Request-ID",
    ) -> None:
        if header.lower() == server_header.lower():
            raise ValueError("header and server_header must be two different headers")
        self.app = app
        self.header = header
        self.server_header = server_header
        self._name = header.lower().encode("latin-1")
        self._server_name = server_header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        given = request_header(scope, self._name)
        client_request_id = given if given and _WELL_FORMED.fullmatch(given) else None
        # The shape of a UUID's hex without its fixed bits.
        request_id = os.urandom(16).hex()
        context = request_context(scope)
        context.request_id = request_id
        context.client_request_id = client_request_id
        ids = (
            (self._name, (client_request_id or request_id).encode("latin-1")),
            (self._server_name, request_id.encode("latin-1")),
        )
        token = REQUEST_ID.set(request_id)
        client_token = CLIENT_REQUEST_ID.set(client_request_id)

        async def send_with_ids(message: Message) -> None:
            if message["type"] == "http.response.start":
                set_response_headers(message, ids)
            await send(message)

        try:
            await self.app(scope, receive, send_with_ids)
        finally:
            CLIENT_REQUEST_ID.reset(client_token)
            REQUEST_ID.reset(token)
