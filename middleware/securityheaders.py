"""Headers that keep responses carrying secrets or secret ids out of caches and sniffers."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.headers import encode_pairs, set_response_headers

DEFAULT_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, *, headers: dict[str, str] | None = None) -> None:
        self.app = app
        self.headers = dict(DEFAULT_HEADERS if headers is None else headers)
        self._pairs = encode_pairs(self.headers.items())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                set_response_headers(message, self._pairs)
            await send(message)

        await self.app(scope, receive, send_with_headers)
