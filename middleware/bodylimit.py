"""Refuse request bodies over a hard cap while they are read, never buffering them whole.

A declared Content-Length over the cap is refused before a byte of the body is read; a
chunked body is counted as it arrives and refused the moment it passes the cap. A request
declaring both a Content-Length and a Transfer-Encoding is refused with 400 and its
connection closed (request smuggling: RFC 9112 section 6.1). Either way
the answer is ``413 {"detail": ...}``. With ``body_timeout``, a body that has not arrived
whole in that time is answered ``408``.

The unread rest of a refused body still has to go somewhere. Over HTTP/1.1 the refusal
closes the connection (``Connection: close``), and whatever the server has queued for the
app meanwhile is discarded while the answer goes out: Hypercorn (0.18) queues at most ten
body chunks per request and then blocks its reader, and the ``http.disconnect`` it queues
when the response ends, until the app reads, so a refused upload nobody read would hold its
connection until shutdown. HTTP/2 has no connection to close for one stream, and some
clients (httpx among them) cannot read an answer that arrives while they are still
uploading, so there the rest of the body is read and discarded first, within the body
deadline and four caps' worth of bytes; past that bound the refusal is sent at once and the
server resets the stream (RST_STREAM, NO_ERROR: ``vault/hypercorn_fixes.py``).
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.headers import request_header

# After the refusal is sent, the server's end-of-request message follows at once.
DRAIN_AFTER_ANSWER_SECONDS = 1.0
DRAIN_BEFORE_ANSWER_SECONDS = 10.0  # HTTP/2 without a body_timeout
DRAIN_BYTES_PER_CAP = 4  # HTTP/2: read at most this many caps' worth before answering anyway
AMBIGUOUS_FRAMING = "a request must not carry both Content-Length and Transfer-Encoding"


async def _discard_rest(receive: Receive, max_bytes: int | None = None) -> None:
    """Read and drop the request's remaining messages until its body or the stream ends."""
    discarded = 0
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        discarded += len(message.get("body", b""))
        if max_bytes is not None and discarded > max_bytes:
            return


def _has_message_waiting(receive: Receive) -> bool:
    """Whether ``receive`` will return without waiting: Hypercorn's receive is ``get`` of
    the request's ``asyncio.Queue``, which suspends only when the queue is empty.

    A receive that cannot wait cannot time out, and arming a deadline costs a timer
    scheduled and cancelled (about 4 us, the dearest step of this layer); by the time a
    handler reads it, a small body has usually arrived whole. Any other receive (another
    server, a test client) is given the deadline.
    """
    queue = getattr(receive, "__self__", None)
    return isinstance(queue, asyncio.Queue) and not queue.empty()


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

    async def _refuse(
        self, status: int, scope: Scope, receive: Receive, send: Send, detail: str | None = None
    ) -> None:
        """Answer 413, 408 or 400 without reading the rest of the body (module docstring)."""
        detail = detail or self.detail
        if status == 408:
            detail = f"the request body took longer than {self.body_timeout:g} s to arrive"
        http1 = str(scope.get("http_version", "1.1")).startswith("1")
        if not http1 and status == 413:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.body_timeout or DRAIN_BEFORE_ANSWER_SECONDS):
                    await _discard_rest(receive, DRAIN_BYTES_PER_CAP * self.max_body_bytes)
        # Connection-specific headers are not allowed in HTTP/2 (or 3).
        headers = {"Connection": "close"} if http1 else None
        refusal = JSONResponse({"detail": detail}, status_code=status, headers=headers)
        # Whatever still arrives is dropped while the answer goes out, over every version:
        # a full queue would block the server's end of the stream (see the module docstring).
        drain = asyncio.create_task(_discard_rest(receive))
        try:
            await refusal(scope, receive, send)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_AFTER_ANSWER_SECONDS):
                    await drain
        finally:
            drain.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = request_header(scope, b"content-length") or ""
        if declared and request_header(scope, b"transfer-encoding") is not None:
            # Two framings: a proxy in front may have read the other one, and what follows
            # on this connection may be a smuggled request. RFC 9112 6.1: close after this.
            await self._refuse(400, scope, receive, send, detail=AMBIGUOUS_FRAMING)
            return
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(413, scope, receive, send)
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
                if _has_message_waiting(receive):
                    message = await receive()
                else:
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
            await self._refuse(408 if isinstance(exc, _BodyTooSlow) else 413, scope, receive, send)
