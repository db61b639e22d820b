"""Optional API keys: ``/vault`` calls need ``Authorization: Bearer <token>`` of a known key.

The keys come already parsed (vault/apikeys.py, from ``API_KEYS_FILE`` or ``API_KEYS``): a
name and the SHA-256 digest of each token (``token_digest``, defined here and used there),
never the token. A request's token is hashed and
compared in constant time with every stored digest. A caller that is let through has the
key's name (never its token) in the request context (``api_key_name``) for the audit log;
any other caller gets ``401`` with ``WWW-Authenticate`` and the app is not called. The
health probes are always open; ``/metrics`` needs its own token when one is configured
(paths in middleware/paths.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection, Mapping

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.context import request_context
from middleware.paths import KEYLESS_PATHS, METRICS_PATH, route_path

# A key name as it appears in the audit log: short, printable, no separators.
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def token_digest(token: str | bytes) -> bytes:
    """SHA-256 of a token: what is kept in memory and compared, never the token itself."""
    # Tokens are long and random (at least 32 characters), so a fast unsalted hash cannot be
    # brute-forced; a slow password hash would only add latency to every request.
    data = token.encode("ascii") if isinstance(token, str) else token
    return hashlib.sha256(data).digest()


_MISSING = "missing"
_MALFORMED = "malformed"
_INVALID = "invalid"


def _bearer_token(scope: Scope) -> bytes | str:
    """The token of the one ``Authorization: Bearer`` header, else _MISSING or _MALFORMED.

    Bytes throughout: a header that is not ASCII (or not even latin-1 text) is just a token
    that matches nothing, never an exception.
    """
    values: list[bytes] = [
        value for name, value in scope["headers"] if name.lower() == b"authorization"
    ]
    if not values:
        return _MISSING
    if len(values) > 1:
        return _MALFORMED
    scheme, _, token = values[0].strip(b" \t").partition(b" ")
    token = token.strip(b" \t")
    if scheme.lower() != b"bearer" or not token:
        return _MALFORMED
    return token


def _refusals(realm: str, what: str) -> dict[str, JSONResponse]:
    """The three 401 answers (no header, a malformed one, a wrong token), built once."""
    challenge = f'Bearer realm="{realm}"'
    return {
        _MISSING: JSONResponse(
            {"detail": f"{what} is required: send the header Authorization: Bearer <token>"},
            status_code=401,
            headers={"WWW-Authenticate": challenge},
        ),
        _MALFORMED: JSONResponse(
            {
                "detail": "the Authorization header must be one header of the form "
                f"'Bearer <token>' carrying {what}"
            },
            status_code=401,
            headers={"WWW-Authenticate": challenge},
        ),
        _INVALID: JSONResponse(
            {"detail": f"the token is not {what} this service knows; check it"},
            status_code=401,
            headers={"WWW-Authenticate": f'{challenge}, error="invalid_token"'},
        ),
    }


class APIKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Mapping[str, bytes],
        protected_prefixes: Collection[str] = ("/vault/",),
        metrics_token_digest: bytes | None = None,
        realm: str = "secret-manager",
    ) -> None:
        if protected_prefixes and not keys:
            raise ValueError(
                "keys is empty, so every protected request would be refused: give at least "
                "one key, or leave APIKeyMiddleware out of the stack to turn API keys off"
            )
        if not protected_prefixes and metrics_token_digest is None:
            raise ValueError("nothing to guard: no protected prefixes and no metrics token")
        for name, digest in keys.items():
            if not KEY_NAME.fullmatch(name):
                raise ValueError(f"key name {name!r} is not 1-64 characters of A-Z a-z 0-9 . _ -")
            if not isinstance(digest, bytes) or len(digest) != hashlib.sha256().digest_size:
                raise ValueError(
                    f"key {name!r}: expected a SHA-256 digest (32 bytes), see token_digest"
                )
        if len(set(keys.values())) != len(keys):
            raise ValueError("two keys have the same token; give every key its own token")
        if metrics_token_digest is not None and len(metrics_token_digest) != 32:
            raise ValueError("metrics_token_digest must be a SHA-256 digest (32 bytes)")
        if not realm or any(c in realm for c in '"\\') or not realm.isprintable():
            raise ValueError(
                f"realm must be printable text without quotes or backslashes: {realm!r}"
            )
        for prefix in protected_prefixes:
            if not prefix.startswith("/"):
                raise ValueError(f"protected prefix {prefix!r} must start with '/'")
        self.app = app
        self.keys = tuple(keys.items())
        self.protected_prefixes = tuple(protected_prefixes)
        # Empty when /metrics is open; a one-key table otherwise, checked like the others.
        self.metrics_keys: tuple[tuple[str, bytes], ...] = (
            ((METRICS_PATH, metrics_token_digest),) if metrics_token_digest is not None else ()
        )
        self.key_refusals = _refusals(realm, "an API key")
        self.metrics_refusals = _refusals(realm, "a metrics token")

    def _protected(self, path: str) -> bool:
        # "/vault" itself is guarded with "/vault/", so the bare prefix is no way around it.
        return path.startswith(self.protected_prefixes) or f"{path}/" in self.protected_prefixes

    @staticmethod
    def _match(token: bytes, keys: tuple[tuple[str, bytes], ...]) -> str | None:
        """The name of the key whose digest is the token's, comparing with every key."""
        presented = token_digest(token)
        matched = None
        # No early exit and compare_digest throughout: the time taken does not depend on
        # which key matched, or on how much of a digest did.
        for name, digest in keys:
            if hmac.compare_digest(presented, digest):
                matched = name
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        path = route_path(scope)
        if path in KEYLESS_PATHS:
            await self.app(scope, receive, send)
            return
        # Only reads of /metrics are guarded: any other method gets its 405 (no data either way).
        metrics = (
            path == METRICS_PATH
            and bool(self.metrics_keys)
            and scope.get("method") in ("GET", "HEAD")
        )
        if metrics:
            keys, refusals = self.metrics_keys, self.metrics_refusals
        elif self._protected(path):
            keys, refusals = self.keys, self.key_refusals
        else:
            await self.app(scope, receive, send)
            return

        token = _bearer_token(scope)
        if isinstance(token, str):
            await refusals[token](scope, receive, send)
            return
        name = self._match(token, keys)
        if name is None:
            await refusals[_INVALID](scope, receive, send)
            return
        if not metrics:
            request_context(scope).api_key_name = name
        await self.app(scope, receive, send)
