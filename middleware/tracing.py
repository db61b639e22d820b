"""A server span per request, joining the caller's trace when it sends a W3C traceparent.

OpenTelemetry's ASGI middleware does the work; the Starlette instrumentor would add it
after start-up, which Starlette refuses, so it is wrapped here and placed in the stack like
any other layer. Health probes and /metrics are not traced (middleware/paths.py). Spans
carry no body and no query string; of the headers, only Host and User-Agent unless an
operator opts in to more with the standard ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*``
variables, and even then credentials are redacted. The request's own id (made by the
server, as its log lines and audit record carry it) is ``vault.request_id``. An exception
escaping the app is recorded by its type only.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.http import (
    OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS,
    get_custom_headers,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.context import request_context
from middleware.paths import UNTRACED_PATHS, is_exempt, route_template

# Redacted whatever header capture an operator turns on.
ALWAYS_REDACTED = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")


class TracingMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        tracer_provider: TracerProvider,
        excluded_paths: Collection[str] = UNTRACED_PATHS,
    ) -> None:
        self.app = app
        self.excluded = frozenset(excluded_paths)
        sanitize = [
            *ALWAYS_REDACTED,
            *get_custom_headers(OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS),
        ]
        self.traced = OpenTelemetryMiddleware(
            self._inner,
            default_span_details=_span_details,
            server_request_hook=_drop_query,
            tracer_provider=tracer_provider,
            http_capture_headers_sanitize_fields=sanitize,
            # One span per ASGI message adds nothing a reader of the trace needs.
            exclude_spans=["receive", "send"],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope, self.excluded):
            await self.app(scope, receive, send)
            return
        await self.traced(scope, receive, send)

    async def _inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        span = trace.get_current_span()
        request_id = request_context(scope).request_id
        if request_id is not None and span.is_recording():
            # The server's own id (never a caller's): the one its log lines and audit
            # record carry, so a trace leads to them and back.
            span.set_attribute("vault.request_id", request_id)
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            # Ended here, the span is no longer recording when the exception reaches the
            # OpenTelemetry middleware, which would otherwise store its message and
            # traceback: exception text can carry data (a driver error may quote a key).
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.end()
            raise


def _span_details(scope: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``METHOD /route/template`` and http.route; just the method for an unknown path.

    OpenTelemetry's HTTP conventions name a span without a known route by its method alone
    and leave http.route out, rather than carry the raw path.
    """
    method = str(scope.get("method", "HTTP"))
    template = route_template(scope)
    if template is None:
        return method, {}
    return f"{method} {template}", {"http.route": template}


def _drop_query(span: trace.Span, scope: dict[str, Any]) -> None:
    """Keep the query string out of the span: the API takes none, so one is a mistake."""
    if not scope.get("query_string") or not span.is_recording():
        return
    attributes = getattr(span, "attributes", None) or {}
    url = attributes.get("http.url")
    if isinstance(url, str):
        span.set_attribute("http.url", url.partition("?")[0])
    if "url.query" in attributes:
        span.set_attribute("url.query", "REDACTED")
