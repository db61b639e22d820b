"""Optional API keys: ``/vault`` calls need ``Authorization: Bearer <token>`` of a known key,
and a key may do only what its scopes allow.

The keys come already parsed (vault/apikeys.py, from ``API_KEYS_FILE`` or ``API_KEYS``) as a
``KeyTable``: per key its name, its tenant, the SHA-256 digest of its token
(``token_digest``, defined here and used there, never the token) and its scopes. A
request's token is hashed and compared in constant time with every stored digest. A caller
that is let through has the key's name within its tenant (never its token), the tenant and
the table it was let in under in the request context (``api_key_name``, ``tenant``,
``keys``); any other caller gets ``401`` with ``WWW-Authenticate`` and the app is not
called. A key without the scope of the operation its path names (``operations``) gets
``403`` before the body is read. The health probes are always open; ``/metrics`` needs its
own token when one is configured (paths in middleware/paths.py).

The table in force lives in a ``LiveKeys`` holder that the app swaps whole when the key
file is re-read (SIGHUP, vault/app.py): each request reads it once, so a request in flight
keeps the keys it started with and the next one sees the new set.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.answers import error_answer, refuse_unread
from middleware.context import request_context
from middleware.paths import KEYLESS_PATHS, METRICS_PATH, route_path

# A key name as it appears in the audit log: short, printable, no separators. A tenant
# follows the same rule.
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# What a key may be allowed to do: one scope per operation (``status`` is the receipts'
# operation, accepted ahead of it). A key given no scopes has every one.
SCOPES: tuple[str, ...] = ("create", "fetch", "delete", "status")
# The tenant of a key whose name has no ``tenant/`` before it.
DEFAULT_TENANT = "default"
_DIGEST_SIZE = hashlib.sha256().digest_size

T = TypeVar("T")


def token_digest(token: str | bytes) -> bytes:
    """SHA-256 of a token: what is kept in memory and compared, never the token itself."""
    # Tokens are long and random (at least 32 characters), so a fast unsalted hash cannot be
    # brute-forced; a slow password hash would only add latency to every request.
    data = token.encode("ascii") if isinstance(token, str) else token
    return hashlib.sha256(data).digest()


def _match(token: bytes, keys: tuple[tuple[T, bytes], ...]) -> T | None:
    """The key whose digest is the token's, comparing with every key."""
    presented = token_digest(token)
    matched = None
    # No early exit and compare_digest throughout: the time taken does not depend on
    # which key matched, or on how much of a digest did.
    for key, digest in keys:
        if hmac.compare_digest(presented, digest):
            matched = key
    return matched


@dataclass(frozen=True, slots=True)
class APIKey:
    """One configured key: its name within its tenant, the digest of its token, its scopes."""

    name: str
    digest: bytes = field(repr=False)
    tenant: str = DEFAULT_TENANT
    scopes: frozenset[str] = frozenset(SCOPES)

    @property
    def label(self) -> str:
        """``tenant/name``, or the bare name in the default tenant: how a key file names it."""
        return self.name if self.tenant == DEFAULT_TENANT else f"{self.tenant}/{self.name}"


@dataclass(frozen=True)
class KeyTable:
    """Every configured key, checked as a whole: valid names and tenants, SHA-256 digests,
    known scopes, one name per key in each tenant, one token per key. Immutable: a new set
    of keys is a new table (``LiveKeys.replace``). Implements middleware.context's
    ``KeyDirectory``."""

    keys: tuple[APIKey, ...] = ()
    # Derived from ``keys`` once: each tenant's names, and each key beside its digest.
    _names: Mapping[str, frozenset[str]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _digests: tuple[tuple[APIKey, bytes], ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        seen: set[tuple[str, str]] = set()
        names: dict[str, set[str]] = {}
        for key in self.keys:
            for part, what in ((key.name, "key name"), (key.tenant, "tenant")):
                if not isinstance(part, str) or not KEY_NAME.fullmatch(part):
                    raise ValueError(f"{what} {part!r} is not 1-64 characters of A-Z a-z 0-9 . _ -")
            if not isinstance(key.digest, bytes) or len(key.digest) != _DIGEST_SIZE:
                raise ValueError(
                    f"key {key.label!r}: expected a SHA-256 digest (32 bytes), see token_digest"
                )
            unknown = key.scopes - set(SCOPES)
            if unknown or not key.scopes:
                raise ValueError(
                    f"key {key.label!r}: scopes must be one or more of {', '.join(SCOPES)}"
                )
            if (key.tenant, key.name) in seen:
                raise ValueError(f"two keys are named {key.label!r}; give every key its own name")
            seen.add((key.tenant, key.name))
            names.setdefault(key.tenant, set()).add(key.name)
        if len({key.digest for key in self.keys}) != len(self.keys):
            raise ValueError("two keys have the same token; give every key its own token")
        object.__setattr__(
            self, "_names", {tenant: frozenset(group) for tenant, group in names.items()}
        )
        object.__setattr__(self, "_digests", tuple((key, key.digest) for key in self.keys))

    def match(self, token: bytes) -> APIKey | None:
        """The key of this token (compared in constant time with every key), or None."""
        return _match(token, self._digests)

    @classmethod
    def of_digests(cls, digests: Mapping[str, bytes]) -> KeyTable:
        """Keys with every scope, from {``name`` or ``tenant/name``: token digest}."""
        keys = []
        for label, digest in digests.items():
            tenant, slash, name = label.rpartition("/")
            keys.append(APIKey(name, digest, tenant if slash else DEFAULT_TENANT))
        return cls(tuple(keys))

    def names_in(self, tenant: str) -> frozenset[str]:
        """The names (without the tenant prefix) of the keys of ``tenant``."""
        return self._names.get(tenant, frozenset())

    def digests(self) -> dict[str, bytes]:
        """{``label``: token digest} of every key."""
        return {key.label: key.digest for key in self.keys}

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[APIKey]:
        return iter(self.keys)


class LiveKeys:
    """The key table in force: replaced whole, never changed in place. A request reads
    ``table`` once and keeps that snapshot, so a replacement (the key file re-read on
    SIGHUP) takes effect with the next request and never in the middle of one."""

    __slots__ = ("_table",)

    def __init__(self, table: KeyTable) -> None:
        self._table = table

    @property
    def table(self) -> KeyTable:
        return self._table

    def replace(self, table: KeyTable) -> KeyTable:
        """Put ``table`` in force (one reference swap); the table it replaces."""
        previous, self._table = self._table, table
        return previous


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


def _denials(realm: str, operations: Collection[str]) -> dict[str, JSONResponse]:
    """The 403 of each operation, for a key without its scope (RFC 6750's
    ``insufficient_scope``), built once."""
    return {
        op: error_answer(
            403,
            f"this API key may not {op} secrets: send the token of a key whose scopes "
            f"include {op}, or ask the operator to give this key the {op} scope",
            headers={
                "WWW-Authenticate": (
                    f'Bearer realm="{realm}", error="insufficient_scope", scope="{op}"'
                )
            },
        )
        for op in operations
    }


class APIKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: LiveKeys | KeyTable | Mapping[str, bytes],
        operations: Mapping[str, str] | None = None,
        on_denied: Callable[[str], None] | None = None,
        protected_prefixes: Collection[str] = ("/vault/",),
        metrics_token_digest: bytes | None = None,
        realm: str = "secret-manager",
    ) -> None:
        """``keys``: the holder the app swaps tables in (or one table, or {label: digest}
        with every scope). ``operations``: the operation of each path ({"/vault/secret/
        fetch": "fetch", ...}), whose scope a key needs; ``on_denied(op)`` counts a
        refusal for scope."""
        if isinstance(keys, LiveKeys):
            live = keys
        else:
            live = LiveKeys(keys if isinstance(keys, KeyTable) else KeyTable.of_digests(keys))
        if protected_prefixes and not live.table:
            raise ValueError(
                "keys is empty, so every protected request would be refused: give at least "
                "one key, or leave APIKeyMiddleware out of the stack to turn API keys off"
            )
        if not protected_prefixes and metrics_token_digest is None:
            raise ValueError("nothing to guard: no protected prefixes and no metrics token")
        if metrics_token_digest is not None and len(metrics_token_digest) != _DIGEST_SIZE:
            raise ValueError("metrics_token_digest must be a SHA-256 digest (32 bytes)")
        if not realm or any(c in realm for c in '"\\') or not realm.isprintable():
            raise ValueError(
                f"realm must be printable text without quotes or backslashes: {realm!r}"
            )
        for prefix in protected_prefixes:
            if not prefix.startswith("/"):
                raise ValueError(f"protected prefix {prefix!r} must start with '/'")
        operations = dict(operations or {})
        for path, op in operations.items():
            if op not in SCOPES:
                raise ValueError(
                    f"operation {op!r} of {path!r} has no scope: scopes are {', '.join(SCOPES)}"
                )
        self.app = app
        self.live = live
        self.operations = operations
        self.on_denied = on_denied
        self.protected_prefixes = tuple(protected_prefixes)
        # Empty when /metrics is open; a one-key table otherwise, checked like the others.
        self.metrics_keys: tuple[tuple[str, bytes], ...] = (
            ((METRICS_PATH, metrics_token_digest),) if metrics_token_digest is not None else ()
        )
        self.key_refusals = _refusals(realm, "an API key")
        self.metrics_refusals = _refusals(realm, "a metrics token")
        self.denials = _denials(realm, set(operations.values()))

    def _protected(self, path: str) -> bool:
        # "/vault" itself is guarded with "/vault/", so the bare prefix is no way around it.
        return path.startswith(self.protected_prefixes) or f"{path}/" in self.protected_prefixes

    _match = staticmethod(_match)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        path = route_path(scope)
        if path in KEYLESS_PATHS:
            await self.app(scope, receive, send)
            return
        # Only reads of /metrics are guarded: any other method gets its 405 (no data either way).
        if (
            path == METRICS_PATH
            and bool(self.metrics_keys)
            and scope.get("method") in ("GET", "HEAD")
        ):
            await self._guard_metrics(scope, receive, send)
        elif self._protected(path):
            await self._guard_keys(path, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _guard_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _bearer_token(scope)
        if isinstance(token, str):
            await self.metrics_refusals[token](scope, receive, send)
        elif self._match(token, self.metrics_keys) is None:
            await self.metrics_refusals[_INVALID](scope, receive, send)
        else:
            # The scraper is not an API key: nothing goes in the context for the audit log.
            await self.app(scope, receive, send)

    async def _guard_keys(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        token = _bearer_token(scope)
        if isinstance(token, str):
            await refuse_unread(self.key_refusals[token], scope, receive, send)
            return
        table = self.live.table  # this request's snapshot, whatever is swapped in meanwhile
        key = table.match(token)
        if key is None:
            await refuse_unread(self.key_refusals[_INVALID], scope, receive, send)
            return
        context = request_context(scope)
        context.api_key_name = key.name
        context.tenant = key.tenant
        context.keys = table
        op = self.operations.get(path)
        if op is not None:
            context.op = op  # the audit record names the operation, refused or not
            if op not in key.scopes:
                if self.on_denied is not None:
                    self.on_denied(op)
                await refuse_unread(self.denials[op], scope, receive, send)  # body never read
                return
        await self.app(scope, receive, send)
