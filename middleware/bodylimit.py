"""Refuse request bodies over a hard cap while they are read, never buffering them whole.

A declared Content-Length over the cap is refused before a byte of the body is read; a
chunked body is counted as it arrives and refused the moment it passes the cap. Either way
the answer is ``413 {"detail": ...}``. With ``body_timeout``, a body that has not arrived
whole in that time is answered ``408``.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.headers import request_header


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        detail: str | None = None,
        body_timeout: float | None = None,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if body_timeout is not None and not body_timeout > 0:
            raise ValueError("body_timeout must be a positive number of seconds")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.detail = detail or f"request body is larger than {max_body_bytes} bytes"
        # The server's read timeout restarts with every byte; a body trickled a byte at a time
        # would hold a connection forever, so the whole body gets one deadline.
        self.body_timeout = body_timeout

    def _refusal(self, status: int = 413) -> JSONResponse:
        # Close the connection: the rest of the body is never read.
        detail = self.detail
        if status == 408:
            detail = f"the request body took longer than {self.body_timeout:g} s to arrive"
        return JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = request_header(scope, b"content-length") or ""
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refusal()(scope, receive, send)
            return

        received = 0
        response_started = False
        deadline: float | None = None

        async def counting_receive() -> Message:
            nonlocal received, deadline
            if self.body_timeout is None:
                message = await receive()
            else:
                loop = asyncio.get_running_loop()
                deadline = deadline or loop.time() + self.body_timeout
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise _BodyTooSlow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def watching_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except (_BodyTooLarge, _BodyTooSlow) as exc:
            if response_started:
                raise
            status = 408 if isinstance(exc, _BodyTooSlow) else 413
            await self._refusal(status)(scope, receive, send)
