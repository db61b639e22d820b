"""Count and time every HTTP request by method, route template and status.

The ``route`` label is the path template of the route that matched (``/items/{item_id}``,
or a Mount's path), from ``paths.route_template`` after the app ran, so labels never carry
a raw path or a secret id. Requests no route matches share ``route="unmatched"``. A nested
router would leave its inner route there, without the Mount's prefix; the vault app has none.

``http_requests_in_progress`` is labelled by method only: the route is not known until the
router has run, and the request is in progress before that. Methods outside the standard
set are labelled ``other`` so a caller cannot mint new series.

After each response, the operation the handler put in the request context feeds the vault
counters: a successful create, and every fetch by outcome.
"""

from __future__ import annotations

from collections.abc import Collection
from time import perf_counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware.context import request_context
from middleware.outcomes import outcome_of
from middleware.paths import UNMATCHED, UNMEASURED_PATHS, is_exempt, route_template
from observability.metrics import (
    HTTP_REQUEST_DURATION,
    HTTP_REQUESTS,
    HTTP_REQUESTS_IN_PROGRESS,
    SECRETS_CREATED,
    SECRETS_DELETED,
    SECRETS_EXPIRED,
    SECRETS_FETCHED,
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})


class PrometheusMiddleware:
    def __init__(self, app: ASGIApp, *, exempt_paths: Collection[str] = UNMEASURED_PATHS) -> None:
        self.app = app
        self.exempt_paths = frozenset(exempt_paths)
        self._gauges: dict[str, Any] = {}
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._fetched: dict[str, Any] = {}
        self._labelled: dict[tuple[Any, str], Any] = {}

    # labels() validates and locks on every call; the label sets here are few and fixed
    # (methods x route templates x statuses), so each child is looked up once and kept.
    def _in_progress(self, method: str) -> Any:
        child = self._gauges.get(method)
        if child is None:
            child = self._gauges[method] = HTTP_REQUESTS_IN_PROGRESS.labels(method)
        return child

    def _series(self, method: str, template: str, status: int) -> tuple[Any, Any]:
        key = (method, template, status)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = (
                HTTP_REQUESTS.labels(method, template, str(status)),
                HTTP_REQUEST_DURATION.labels(method, template),
            )
        return series

    def _child(self, metric: Any, value: str) -> Any:
        """``metric.labels(value)``, looked up once (a series appears when first counted)."""
        child = self._labelled.get((metric, value))
        if child is None:
            child = self._labelled[metric, value] = metric.labels(value)
        return child

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope, self.exempt_paths):
            await self.app(scope, receive, send)
            return

        method = scope["method"] if scope["method"] in _METHODS else "other"
        status = 500  # what the server answers if the app ends without a response

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_progress = self._in_progress(method)
        in_progress.inc()
        start = perf_counter()
        try:
            await self.app(scope, receive, observing_send)
        except Exception:
            status = 500
            raise
        finally:
            elapsed = perf_counter() - start
            in_progress.dec()
            template = route_template(scope) or UNMATCHED
            requests, duration = self._series(method, template, status)
            requests.inc()
            duration.observe(elapsed)
            op = request_context(scope).op
            if op == "create" and status == 200:
                SECRETS_CREATED.inc()
            elif op == "fetch":
                outcome = outcome_of(scope, status)
                fetched = self._fetched.get(outcome)
                if fetched is None:
                    fetched = self._fetched[outcome] = SECRETS_FETCHED.labels(outcome)
                fetched.inc()
                if outcome == "expired":
                    self._child(SECRETS_EXPIRED, "fetch").inc()
            elif op == "delete":
                outcome = outcome_of(scope, status)
                if status == 200:
                    self._child(SECRETS_DELETED, "request").inc()
                elif outcome == "expired":
                    self._child(SECRETS_EXPIRED, "delete").inc()
