"""Which paths each layer leaves alone, the one rule that matches them, and route templates.

Exemptions match the route path (the request path without the server's ``root_path``, the
path the router matches) exactly. Slash redirects are off, so ``/metrics/`` or
``/healthz/`` is not the endpoint but an unknown path that answers 404: every layer treats
it like any other unknown path (traced, counted, rate limited, audited when under /vault).
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.routing import Match
from starlette.types import Scope

PROBE_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"

# Probes and scrapes would only fill traces with noise.
UNTRACED_PATHS = PROBE_PATHS | {METRICS_PATH}
# A scrape counted by the metrics it reads would change them by being read.
UNMEASURED_PATHS = frozenset({METRICS_PATH})
# An orchestrator or a scraper refused with 429 would restart or lose sight of the service.
UNLIMITED_PATHS = PROBE_PATHS | {METRICS_PATH}
# An orchestrator has no API key; /metrics has a token of its own (APIKeyMiddleware).
KEYLESS_PATHS = PROBE_PATHS

UNMATCHED = "unmatched"  # the one label of every request no route matches


def route_path(scope: Scope) -> str:
    """The path the router matches (``root_path`` removed), so no prefix slips past a check."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path + "/"):
        return path[len(root_path) :]
    return path


def is_exempt(scope: Scope, paths: Collection[str]) -> bool:
    """True when the request's route path is exactly one of ``paths``."""
    return route_path(scope) in paths


def route_template(scope: Scope) -> str | None:
    """The path template of the route that answers this request, or None when none does.

    After routing, the router's own choice (``scope["route"]``); before it (tracing starts
    first, and a layer may refuse before the router runs), the app's routes are matched as
    the router would: a full match first, else the first partial one (the method differs,
    answered 405). A Mount at the root has the path ``""``, labelled ``/``.
    """
    route = scope.get("route")
    if route is None:
        for candidate in getattr(scope.get("app"), "routes", ()):
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and route is None:
                route = candidate
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return None
    return path or "/"
