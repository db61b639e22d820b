"""Turn any unhandled exception into a generic 500 and one log line, never a traceback.

Starlette's own ServerErrorMiddleware re-raises so the server logs a traceback; exception
text can carry data (a driver error may quote a document), so here only the exception
type and where it was raised are logged, with the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.answers import RETRY_AFTER_SECONDS, error_answer
from middleware.context import request_context

SHUTTING_DOWN_DETAIL = "the server is shutting down and did not finish this request; retry"
GENERIC_DETAIL = (
    "internal error; the request id in X-Server-Request-ID identifies it in the server log"
)


class InternalErrorMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        logger: logging.Logger | None = None,
        retry_after: int = RETRY_AFTER_SECONDS,
    ) -> None:
        self.app = app
        self.logger = logger or logging.getLogger("secret_manager.errors")
        self.shutting_down = error_answer(
            503, SHUTTING_DOWN_DETAIL, retry_after=retry_after, headers={"Connection": "close"}
        )
        self.internal_error = error_answer(500, GENERIC_DETAIL)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        response_started = False

        async def watch_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, watch_send)
        except asyncio.CancelledError:
            # The server's graceful timeout ran out for this request: tell the client to
            # retry instead of letting the server answer a bare 500, then stop as asked.
            if not response_started:
                with contextlib.suppress(Exception):
                    await self.shutting_down(scope, receive, send)
            raise
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            context = request_context(scope)
            self.logger.error(
                "unhandled %s at %s:%s in %s",
                type(exc).__name__,
                Path(frame.filename).name,
                frame.lineno,
                frame.name,
                extra={
                    "request_id": context.request_id,
                    "client_request_id": context.client_request_id,
                },
            )
            if not response_started:
                await self.internal_error(scope, receive, send)
