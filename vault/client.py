"""The Python client of secret-manager: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both have the same four methods, one per operation of the API (docs/api.md), and raise the
same typed errors::

    from vault.client import Client, NotFound

    with Client("https://vault.example.com", token="...") as vault:
        created = vault.create(b"hunter2", ttl_seconds=3600, max_reads=1, receipt=True)
        secret = vault.fetch(created.secret_id).secret  # b"hunter2"
        guarded = vault.create(b"hunter3", passphrase="correct horse")
        vault.fetch(guarded.secret_id, passphrase="correct horse")
        print(vault.status(created.receipt_id).state)  # "used_up"

The base URL and the API key come from the arguments, or else from ``SECRET_MANAGER_URL``
(default ``http://localhost:8000``) and ``SECRET_MANAGER_TOKEN``, the variables the
``secret-manager`` commands read.

Retries (docs/client.md says why each is safe): a call is sent at most ``max_attempts``
times within ``max_total_seconds``. A 429 or 503 is retried after its ``Retry-After``, and
a failure to connect after an exponential backoff with jitter; a wait that would end past
the time budget is not begun, the typed error is raised at once. A create sends one
``Idempotency-Key`` on every attempt, so it may also be retried after the request went out
and the connection failed before an answer (a reset, a read timeout): the server stores one
secret for one key. A fetch or a delete is never retried once the request may have reached
the server: a fetch of a read-limited secret may have spent its read. A status changes
nothing, and is retried as a create is. No 403 is ever retried: a wrong passphrase is one
of the tries the server counts before it deletes the secret, and a repeat would be another.

This module is the package's only public API besides the command line, and is kept light:
it imports httpx2, the standard library and the package's error base (vault/errors.py, itself
the standard library only), nothing of the server (an import contract in pyproject.toml
says so).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import logging
import os
import random
import re
import ssl
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import httpx2

from vault import __version__
from vault.errors import ConfigError, VaultError

__all__ = [
    "DEFAULT_URL",
    "TOKEN_VARIABLE",
    "URL_VARIABLE",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ClientError",
    "ConfigurationError",
    "Conflict",
    "Created",
    "Fetched",
    "Forbidden",
    "NotFound",
    "RateLimited",
    "Status",
    "Unauthorized",
    "Unavailable",
    "UnexpectedAnswer",
]

log = logging.getLogger("secret_manager.client")

URL_VARIABLE: Final = "SECRET_MANAGER_URL"
TOKEN_VARIABLE: Final = "SECRET_MANAGER_TOKEN"  # noqa: S105 - its name, not a token
DEFAULT_URL: Final = "http://localhost:8000"

# What a Bearer header carries (RFC 6750's b64token), the characters API keys are made of.
# A token with any other character is refused here, without quoting it: sent, it would be
# quoted back by the HTTP library's error about an illegal header value.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")

REQUEST_ID_HEADER: Final = "X-Server-Request-ID"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"


# --- errors ---------------------------------------------------------------------------------


class ClientError(VaultError):
    """Every error this client raises on purpose (a VaultError, as every error of the
    package is).

    ``status`` is the HTTP status of the answer (None when there was none), ``detail`` the
    server's ``detail`` (or what went wrong on the way), ``request_id`` the answer's
    ``X-Server-Request-ID`` (quote it when you report a problem) and ``attempts`` how many
    times the request was sent.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        request_id: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = message if detail is None else detail
        self.request_id = request_id
        self.attempts = attempts


class ConfigurationError(ClientError, ConfigError, ValueError):
    """The URL, the token or an option cannot be used; raised by the constructor, before any
    request."""


class BadRequest(ClientError):
    """400, 413, 415 or 422: the server refused the request as it is; the detail says why."""


class Unauthorized(ClientError):
    """401: API keys are on, and no token, a malformed one or an unknown one was sent."""


class Forbidden(ClientError):
    """403: the API key may not do this operation, or the secret is under a passphrase and
    none or a wrong one was sent (the detail says which, and how many wrong tries are left).
    Never retried: the server counts each wrong passphrase."""


class NotFound(ClientError):
    """404: no secret (or receipt) has this id for this caller, whatever the reason."""


class Conflict(ClientError):
    """409: the same ``Idempotency-Key`` is still being answered (after the retries)."""


class RateLimited(ClientError):
    """429: too many requests; ``retry_after`` is the server's ``Retry-After`` in seconds."""

    retry_after: float | None = None


class Unavailable(ClientError):
    """503 or another 5xx, or no answer at all (connection refused, reset, timed out).

    ``status`` is None when no answer came; ``retry_after`` the server's ``Retry-After``.
    """

    retry_after: float | None = None


class UnexpectedAnswer(ClientError):
    """An answer that is not the API's: not JSON, or a field of the wrong type (a proxy's
    error page, or a server of another version)."""


_ERRORS: Mapping[int, type[ClientError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: BadRequest,
    415: BadRequest,
    422: BadRequest,
    429: RateLimited,
}


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Created:
    """A create's answer. ``expires_at`` and ``reads_left`` are set when the secret has a
    ttl or a read limit, ``readers`` when it names readers, ``receipt_id`` when a receipt
    was asked for. ``answer`` is the JSON object as the server sent it."""

    secret_id: str
    expires_at: dt.datetime | None = None
    reads_left: int | None = None
    readers: tuple[str, ...] | None = None
    receipt_id: str | None = None
    answer: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Fetched:
    """A fetch's answer: the secret, and its lifecycle after this read (``reads_left``: the
    reads remaining, 0 when this was the last one). Neither ``secret`` nor ``answer`` is
    in the repr, so logging a result never logs a secret."""

    secret: bytes = field(repr=False)
    expires_at: dt.datetime | None = None
    reads_left: int | None = None
    readers: tuple[str, ...] | None = None
    answer: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Status:
    """What became of a secret made with a receipt (docs/api.md, "Receipts"); None where a
    field does not apply. ``state``: ``active``, ``used_up``, ``expired`` or ``deleted``;
    ``passphrase_failures``: the wrong passphrases tried, for a secret under one only."""

    state: str
    label: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    max_reads: int | None
    reads_left: int | None
    reads: int
    first_read_at: dt.datetime | None
    last_read_at: dt.datetime | None
    ended_at: dt.datetime | None
    passphrase_failures: int | None = None
    answer: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


# --- reading answers ------------------------------------------------------------------------


def _unexpected(op: str, what: str, response: httpx2.Response) -> UnexpectedAnswer:
    return UnexpectedAnswer(
        f"the {op} answer is not the API's: {what}",
        status=response.status_code,
        request_id=response.headers.get(REQUEST_ID_HEADER),
    )


class _Fields:
    """Typed access to an answer's fields; a field of the wrong type is UnexpectedAnswer."""

    def __init__(self, op: str, answer: Mapping[str, Any], response: httpx2.Response) -> None:
        self.op, self.answer, self.response = op, answer, response

    def _wrong(self, name: str, kind: str) -> UnexpectedAnswer:
        return _unexpected(self.op, f"field {name!r} is not {kind}", self.response)

    def text(self, name: str) -> str:
        value = self.answer.get(name)
        if not isinstance(value, str):
            raise self._wrong(name, "a string")
        return value

    def optional_text(self, name: str) -> str | None:
        return None if self.answer.get(name) is None else self.text(name)

    def optional_int(self, name: str) -> int | None:
        value = self.answer.get(name)
        if value is not None and (type(value) is not int):
            raise self._wrong(name, "an integer")
        return value

    def integer(self, name: str) -> int:
        value = self.optional_int(name)
        if value is None:
            raise self._wrong(name, "an integer")
        return value

    def optional_time(self, name: str) -> dt.datetime | None:
        text = self.optional_text(name)
        if text is None:
            return None
        try:
            return dt.datetime.fromisoformat(text)
        except ValueError:
            raise self._wrong(name, "an RFC 3339 time") from None

    def time(self, name: str) -> dt.datetime:
        value = self.optional_time(name)
        if value is None:
            raise self._wrong(name, "an RFC 3339 time")
        return value

    def optional_names(self, name: str) -> tuple[str, ...] | None:
        value = self.answer.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self._wrong(name, "a list of strings")
        return tuple(value)

    def secret(self) -> bytes:
        try:
            return base64.b64decode(self.text("secret"), validate=True)
        except binascii.Error:
            raise self._wrong("secret", "base64") from None


def _created(fields: _Fields) -> Created:
    return Created(
        secret_id=fields.text("secret_id"),
        expires_at=fields.optional_time("expires_at"),
        reads_left=fields.optional_int("reads_left"),
        readers=fields.optional_names("readers"),
        receipt_id=fields.optional_text("receipt_id"),
        answer=fields.answer,
    )


def _fetched(fields: _Fields) -> Fetched:
    return Fetched(
        secret=fields.secret(),
        expires_at=fields.optional_time("expires_at"),
        reads_left=fields.optional_int("reads_left"),
        readers=fields.optional_names("readers"),
        answer=fields.answer,
    )


def _status(fields: _Fields) -> Status:
    return Status(
        state=fields.text("state"),
        label=fields.optional_text("label"),
        created_at=fields.time("created_at"),
        expires_at=fields.optional_time("expires_at"),
        max_reads=fields.optional_int("max_reads"),
        reads_left=fields.optional_int("reads_left"),
        reads=fields.integer("reads"),
        first_read_at=fields.optional_time("first_read_at"),
        last_read_at=fields.optional_time("last_read_at"),
        ended_at=fields.optional_time("ended_at"),
        passphrase_failures=fields.optional_int("passphrase_failures"),
        answer=fields.answer,
    )


def _retry_after(response: httpx2.Response) -> float | None:
    """``Retry-After`` in seconds from now: delay-seconds or an HTTP date; None without."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _error(response: httpx2.Response) -> ClientError:
    """The typed error of an answer that is not a 200, with the server's detail."""
    status = response.status_code
    try:
        detail = response.json()["detail"]
        if not isinstance(detail, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        detail = response.text.strip() or response.reason_phrase or "no detail"
    kind = _ERRORS.get(status)
    if kind is None:
        kind = Unavailable if status >= 500 else ClientError
    error = kind(
        f"HTTP {status}: {detail}",
        status=status,
        detail=detail,
        request_id=response.headers.get(REQUEST_ID_HEADER),
    )
    if isinstance(error, RateLimited | Unavailable):
        error.retry_after = _retry_after(response)
    return error


def _answer(op: str, response: httpx2.Response) -> dict[str, Any]:
    """A 200's JSON object; any other answer is its typed error."""
    if response.status_code != 200:
        if response.status_code < 400:
            raise _unexpected(op, f"HTTP {response.status_code}", response)
        raise _error(response)
    try:
        answer = response.json()
    except ValueError:
        raise _unexpected(op, "not JSON", response) from None
    if not isinstance(answer, dict):
        raise _unexpected(op, "not a JSON object", response)
    return answer


# --- what may be retried --------------------------------------------------------------------


@dataclass(frozen=True)
class _Operation:
    name: str
    path: str
    # May be sent again after it may have reached the server: a create, because it carries
    # an Idempotency-Key (a repeat is answered with the first answer, nothing new stored),
    # and a status, which changes nothing. Never a fetch (it may have spent a read) nor a
    # delete (a repeat of one that went through answers 404). No operation is sent again
    # after a 403 (see _Attempts.after_answer).
    replayable: bool
    keyed: bool = False  # sends an Idempotency-Key, once per call


CREATE = _Operation("create", "/vault/secret/create", replayable=True, keyed=True)
FETCH = _Operation("fetch", "/vault/secret/fetch", replayable=False)
DELETE = _Operation("delete", "/vault/secret/delete", replayable=False)
STATUS = _Operation("status", "/vault/secret/status", replayable=True)

# Failures where the request cannot have reached the server: no connection was made (refused,
# unreachable, TLS handshake failed, connect timed out) or none was free in time.
_NOT_SENT = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout)
# The rest may have been sent, in part or whole: a write or read error or timeout, a reset,
# a connection closed before the answer (RemoteProtocolError).
_MAYBE_SENT = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)


def _certificate_problem(exc: BaseException) -> bool:
    """A TLS failure (an untrusted certificate, a wrong host name): retrying cannot help."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Attempts:
    """One call's attempts: how long each may take, and whether and when to try again."""

    def __init__(self, client: _Base, op: _Operation) -> None:
        self.client, self.op = client, op
        self.started = time.monotonic()
        self.deadline = self.started + client.max_total_seconds
        self.count = 0

    def timeout(self) -> httpx2.Timeout:
        """This attempt's timeout: the client's, cut to what is left of the time budget."""
        self.count += 1
        left = max(self.deadline - time.monotonic(), 0.001)
        return httpx2.Timeout(min(self.client.timeout, left))

    def after_failure(self, exc: httpx2.HTTPError) -> float:
        """A request that got no answer: the wait before the next attempt, or Unavailable."""
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, _NOT_SENT):
            message = f"cannot reach {self.client.url}: {reason}"
        else:  # the caller must know that it may have happened
            message = (
                f"no answer from {self.client.url}: {reason}; "
                f"the {self.op.name} may have been carried out"
            )
        error = Unavailable(message, detail=reason)
        never_sent = isinstance(exc, _NOT_SENT) and not _certificate_problem(exc)
        maybe_sent = isinstance(exc, _MAYBE_SENT)
        retry = never_sent or (maybe_sent and self.op.replayable)
        return self._wait_or_raise(error, self._backoff() if retry else None, cause=exc)

    def after_answer(self, error: ClientError) -> float:
        """An error answer: the wait before the next attempt, or ``error`` raised. Every
        4xx but 429 (and a keyed retry's 409) is final: a 403 to a fetch with a wrong
        passphrase is one of the tries the server counts before it deletes the secret."""
        wait = None
        if error.status in (429, 503):
            retry_after = getattr(error, "retry_after", None)
            wait = self._backoff() if retry_after is None else retry_after
        elif error.status in (502, 504) and self.op.replayable:
            # A proxy that got no answer from the server: the request may have been acted
            # on, which only a replayable request may be sent again after.
            wait = self._backoff()
        elif error.status == 409 and self.op.keyed and self.count > 1:
            # Our own earlier attempt, cut off on its way back, is still being answered:
            # the next attempt gets its answer replayed.
            wait = self._backoff()
        return self._wait_or_raise(error, wait)

    def _backoff(self) -> float:
        """Exponential backoff with jitter: the nth retry waits between half and all of
        ``backoff_seconds * 2**(n-1)``, at most ``max_backoff``."""
        ceiling = min(self.client.backoff_seconds * 2 ** (self.count - 1), self.client.max_backoff)
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret

    def _wait_or_raise(
        self, error: ClientError, wait: float | None, cause: BaseException | None = None
    ) -> float:
        """``wait``, unless ``error`` ends the call: not retryable (no wait), the attempts
        spent, or a wait that would end past the time budget (given up at once)."""
        error.attempts = self.count
        if wait is None or self.count >= self.client.max_attempts:
            raise error from cause
        if wait >= self.deadline - time.monotonic():
            raise error from cause
        log.info(
            "%s: %s (attempt %d of %d); retrying in %.2f s",
            self.op.name,
            error.detail if error.status is None else f"HTTP {error.status}",
            self.count,
            self.client.max_attempts,
            wait,
        )
        return wait


# --- the clients ----------------------------------------------------------------------------


def _url(url: str | None, environ: Mapping[str, str]) -> str:
    source = "url"
    if url is None:
        url = environ.get(URL_VARIABLE, "").strip() or DEFAULT_URL
        source = URL_VARIABLE
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"{source} must start with http:// or https://, got {url!r}")
    try:
        parsed = httpx2.URL(url)
    except httpx2.InvalidURL as exc:
        raise ConfigurationError(f"{source} is not a usable URL ({exc}): {url!r}") from None
    if not parsed.host:
        raise ConfigurationError(f"{source} names no host: {url!r}")
    return url.rstrip("/")


def _token(token: str | None, environ: Mapping[str, str]) -> str | None:
    source = "token"
    if token is None:
        token = environ.get(TOKEN_VARIABLE, "")
        source = TOKEN_VARIABLE
        if not token.strip():
            return None
    token = token.strip()
    if not _TOKEN.fullmatch(token):
        raise ConfigurationError(
            f"{source}: the token is empty or has characters a Bearer header cannot carry "
            "(A-Z a-z 0-9 - . _ ~ + / and trailing =)"
        )
    return token


def _create_body(
    encoded: str,
    ttl_seconds: int | None,
    max_reads: int | None,
    readers: Sequence[str] | None,
    receipt: bool,
    label: str | None,
    passphrase: str | None = None,
) -> dict[str, Any]:
    """A create's JSON body; fields left at their default are left out, as the API asks.
    Built once per call: every attempt sends this same body with the same Idempotency-Key,
    which the server needs to answer a retry with the first answer (a different body under
    the same key is a 422)."""
    body: dict[str, Any] = {"secret": encoded}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    if max_reads is not None:
        body["max_reads"] = max_reads
    if readers is not None:
        if isinstance(readers, str):
            raise TypeError("readers is a list of API key names, not one string")
        body["readers"] = list(readers)
    if receipt:
        body["receipt"] = True
    if label is not None:
        body["label"] = label
    if passphrase is not None:
        body["passphrase"] = _passphrase(passphrase)
    return body


def _fetch_body(secret_id: str, passphrase: str | None) -> dict[str, Any]:
    """A fetch's JSON body: the id, and the passphrase when one is given."""
    body: dict[str, Any] = {"secret_id": secret_id}
    if passphrase is not None:
        body["passphrase"] = _passphrase(passphrase)
    return body


def _passphrase(passphrase: str) -> str:
    """A passphrase as sent: text (its length is the server's to judge, whose 400 never
    quotes it); anything else is a TypeError that does not quote it either."""
    if not isinstance(passphrase, str):
        raise TypeError(f"passphrase must be a str, got {type(passphrase).__name__}")
    return passphrase


def _encode(secret: bytes) -> str:
    if not isinstance(secret, bytes | bytearray | memoryview):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    return base64.b64encode(secret).decode("ascii")


class _Base:
    """What both clients share: their settings, headers and retry rules."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        max_attempts: int = 5,
        max_total_seconds: float = 30.0,
        backoff_seconds: float = 0.25,
        max_backoff: float = 5.0,
        verify: ssl.SSLContext | str | bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.url = _url(url, env)
        self._token = _token(token, env)
        if max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be at least 1, got {max_attempts}")
        for name, value in (
            ("timeout", timeout),
            ("max_total_seconds", max_total_seconds),
            ("backoff_seconds", backoff_seconds),
            ("max_backoff", max_backoff),
        ):
            if not value > 0:
                raise ConfigurationError(f"{name} must be more than 0 seconds, got {value}")
        self.timeout = float(timeout)
        self.max_attempts = max_attempts
        self.max_total_seconds = float(max_total_seconds)
        self.backoff_seconds = float(backoff_seconds)
        self.max_backoff = float(max_backoff)
        self._open(verify)

    def _open(self, verify: ssl.SSLContext | str | bool) -> None:
        """Make the client's own httpx2 client (blocking or async)."""
        raise NotImplementedError

    def __repr__(self) -> str:  # never the token
        return f"{type(self).__name__}({self.url!r})"

    def _headers(self, op: _Operation) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"secret-manager/{__version__}"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        if op.keyed:
            # Once per call, the same on every attempt: the server stores one secret per key.
            headers[IDEMPOTENCY_HEADER] = str(uuid.uuid4())
        return headers


class Client(_Base):
    """A blocking client. Use it as a context manager, or call ``close()``, to close its
    connections; one client may be shared by threads.

    ``url`` and ``token`` default to ``SECRET_MANAGER_URL`` and ``SECRET_MANAGER_TOKEN``
    (``environ``, default ``os.environ``). ``timeout`` bounds each phase of one attempt
    (connect, send, wait for the answer); a call makes at most ``max_attempts`` attempts
    within ``max_total_seconds``, backing off from ``backoff_seconds`` to at most
    ``max_backoff`` between failed connections. ``verify``: as httpx2's (True, a CA
    bundle's path, or an ``ssl.SSLContext``).
    """

    _http: httpx2.Client

    def _open(self, verify: ssl.SSLContext | str | bool) -> None:
        self._http = httpx2.Client(verify=verify)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def create(
        self,
        secret: bytes,
        *,
        ttl_seconds: int | None = None,
        max_reads: int | None = None,
        readers: Sequence[str] | None = None,
        receipt: bool = False,
        label: str | None = None,
        passphrase: str | None = None,
    ) -> Created:
        """Store ``secret``; retried safely after any failure, with one Idempotency-Key.
        With ``passphrase``, it is fetched only with the same passphrase."""
        body = _create_body(
            _encode(secret), ttl_seconds, max_reads, readers, receipt, label, passphrase
        )
        return _created(self._call(CREATE, body))

    def fetch(self, secret_id: str, *, passphrase: str | None = None) -> Fetched:
        """The secret stored under ``secret_id`` (a read of a read-limited one is spent);
        ``passphrase`` for a secret created with one (Forbidden without it or with a wrong
        one, each wrong one counted by the server: never retried)."""
        return _fetched(self._call(FETCH, _fetch_body(secret_id, passphrase)))

    def delete(self, secret_id: str) -> None:
        """Delete the secret stored under ``secret_id``; NotFound when there is none."""
        self._call(DELETE, {"secret_id": secret_id})

    def status(self, receipt_id: str) -> Status:
        """What became of the secret made with this receipt; never spends a read."""
        return _status(self._call(STATUS, {"receipt_id": receipt_id}))

    def _call(self, op: _Operation, body: Mapping[str, Any]) -> _Fields:
        url = self.url + op.path
        headers = self._headers(op)
        attempts = _Attempts(self, op)
        while True:
            try:
                response = self._http.post(
                    url, json=body, headers=headers, timeout=attempts.timeout()
                )
            except httpx2.HTTPError as exc:
                wait = attempts.after_failure(exc)
            else:
                try:
                    return _Fields(op.name, _answer(op.name, response), response)
                except ClientError as error:
                    wait = attempts.after_answer(error)
            time.sleep(wait)


class AsyncClient(_Base):
    """The same client for ``async`` code (asyncio or trio, through anyio): the same
    arguments and methods, awaited. Use it as an async context manager, or ``aclose()``."""

    _http: httpx2.AsyncClient

    def _open(self, verify: ssl.SSLContext | str | bool) -> None:
        self._http = httpx2.AsyncClient(verify=verify)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create(
        self,
        secret: bytes,
        *,
        ttl_seconds: int | None = None,
        max_reads: int | None = None,
        readers: Sequence[str] | None = None,
        receipt: bool = False,
        label: str | None = None,
        passphrase: str | None = None,
    ) -> Created:
        """Store ``secret``; retried safely after any failure, with one Idempotency-Key.
        With ``passphrase``, it is fetched only with the same passphrase."""
        body = _create_body(
            _encode(secret), ttl_seconds, max_reads, readers, receipt, label, passphrase
        )
        return _created(await self._call(CREATE, body))

    async def fetch(self, secret_id: str, *, passphrase: str | None = None) -> Fetched:
        """The secret stored under ``secret_id`` (a read of a read-limited one is spent);
        ``passphrase`` for a secret created with one (Forbidden without it or with a wrong
        one, each wrong one counted by the server: never retried)."""
        return _fetched(await self._call(FETCH, _fetch_body(secret_id, passphrase)))

    async def delete(self, secret_id: str) -> None:
        """Delete the secret stored under ``secret_id``; NotFound when there is none."""
        await self._call(DELETE, {"secret_id": secret_id})

    async def status(self, receipt_id: str) -> Status:
        """What became of the secret made with this receipt; never spends a read."""
        return _status(await self._call(STATUS, {"receipt_id": receipt_id}))

    async def _call(self, op: _Operation, body: Mapping[str, Any]) -> _Fields:
        url = self.url + op.path
        headers = self._headers(op)
        attempts = _Attempts(self, op)
        while True:
            try:
                response = await self._http.post(
                    url, json=body, headers=headers, timeout=attempts.timeout()
                )
            except httpx2.HTTPError as exc:
                wait = attempts.after_failure(exc)
            else:
                try:
                    return _Fields(op.name, _answer(op.name, response), response)
                except ClientError as error:
                    wait = attempts.after_answer(error)
            await anyio.sleep(wait)
