"""vault.client against real servers: a ``secret-manager serve`` subprocess on SQLite, and a
small scripted HTTP server on 127.0.0.1 (this module's ``Scripted``) that answers 429 or 503
with ``Retry-After``, drops connections after reading a request, or passes requests on to
the real server. Every time is measured where the server sees the request arrive.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import ServerProcess, clean_env, free_port
from vault.client import (
    DEFAULT_URL,
    AsyncClient,
    BadRequest,
    Client,
    ClientError,
    ConfigurationError,
    Conflict,
    Created,
    Fetched,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    UnexpectedAnswer,
)
from vault.errors import ConfigError, VaultError
from vault.settings import SECRET_MANAGER_URL, client_token

pytestmark = pytest.mark.slow

TOKENS = {
    "acme/ci": "ci-" + "c" * 40,  # every scope
    "acme/billing": "billing-" + "b" * 40,  # fetch and delete only
    "acme/web": "web-" + "w" * 40,
}
REQUEST_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def server(start_server: Callable[..., ServerProcess], tmp_path: Path, master_key: str) -> Any:
    return start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data"), "RATE_LIMIT": "off"}
    )


@pytest.fixture
def guarded(start_server: Callable[..., ServerProcess], tmp_path: Path, master_key: str) -> Any:
    keys = tmp_path / "api_keys"
    keys.write_text(
        f"acme/ci:{TOKENS['acme/ci']}\n"
        f"acme/billing:{TOKENS['acme/billing']}:fetch+delete\n"
        f"acme/web:{TOKENS['acme/web']}\n"
    )
    return start_server(
        {
            "MASTER_KEY": master_key,
            "DATA_DIR": str(tmp_path / "data"),
            "API_KEYS_FILE": str(keys),
            "RATE_LIMIT": "off",
        }
    )


# --- a scripted server ----------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the scripted server received it."""

    at: float  # time.monotonic() when its head arrived
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"detail": "scripted"}'


# The other steps: pass the request on to the real server; read it, then close the
# connection (FIN) or reset it (RST) without an answer; read it, then wait this long.
PROXY, CLOSE, RESET = "proxy", "close", "reset"


@dataclass(frozen=True)
class Stall:
    seconds: float


Step = Answer | Stall | str


class Scripted:
    """A real HTTP/1.1 server on 127.0.0.1: the nth request gets the nth step of ``steps``
    (the last step repeats). ``port`` 0 picks a free one; ``delay`` starts listening only
    that long after construction (a server starting up: connections are refused until)."""

    def __init__(
        self,
        steps: Sequence[Step],
        upstream: str | None = None,
        *,
        port: int = 0,
        delay: float = 0.0,
    ) -> None:
        self.steps = list(steps)
        self.upstream = upstream
        self.seen: list[Seen] = []
        self.started_at: float | None = None
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._lock = threading.Lock()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._starter = threading.Timer(delay, self._start)
        self._starter.start()
        if delay == 0:
            self._starter.join()

    def _start(self) -> None:
        scripted = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                at = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with scripted._lock:
                    scripted.seen.append(Seen(at, self.path, dict(self.headers.items()), body))
                    step = scripted.steps[min(len(scripted.seen), len(scripted.steps)) - 1]
                try:
                    scripted._answer(self, step, body)
                except OSError:  # the client gave up on this connection: nothing to tell
                    self.close_connection = True

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.started_at = time.monotonic()
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def _answer(self, handler: http.server.BaseHTTPRequestHandler, step: Step, body: bytes) -> None:
        if step == CLOSE:
            handler.close_connection = True
            return
        if step == RESET:
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            handler.connection.close()
            handler.close_connection = True
            return
        if isinstance(step, Stall):
            time.sleep(step.seconds)
            handler.close_connection = True
            return
        if step == PROXY:
            assert self.upstream is not None
            passed = {
                k: v
                for k, v in handler.headers.items()
                if k.lower() in ("content-type", "authorization", "idempotency-key")
            }
            real = httpx2.post(self.upstream + handler.path, content=body, headers=passed)
            kept = ("content-type", "x-server-request-id", "retry-after")
            step = Answer(
                real.status_code,
                {k: v for k, v in real.headers.items() if k.lower() in kept},
                real.content,
            )
        assert isinstance(step, Answer)
        handler.send_response(step.status)
        for name, value in {"Content-Type": "application/json", **step.headers}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(step.body)))
        handler.end_headers()
        handler.wfile.write(step.body)

    def gaps(self) -> list[float]:
        """Seconds between one request's arrival and the next's."""
        return [b.at - a.at for a, b in zip(self.seen, self.seen[1:], strict=False)]

    def keys(self) -> list[str | None]:
        return [seen.headers.get("Idempotency-Key") for seen in self.seen]

    def close(self) -> None:
        self._starter.cancel()
        self._starter.join()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def make(steps: Sequence[Step], upstream: str | None = None, **options: Any) -> Scripted:
        servers.append(Scripted(steps, upstream, **options))
        return servers[-1]

    yield make
    for made in servers:
        made.close()


def busy(status: int, retry_after: str | None = "1") -> Answer:
    headers = {"X-Server-Request-ID": "f" * 32}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return Answer(status, headers, json.dumps({"detail": f"busy ({status})"}).encode())


def timeline(server: Scripted) -> str:
    """Each attempt's arrival, in seconds after the first: what docs/client.md quotes."""
    start = server.seen[0].at
    return ", ".join(f"{seen.at - start:.3f}" for seen in server.seen)


# --- the module stays light -----------------------------------------------------------------


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    code = (
        "import sys, vault.client; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} "
        "| {m for m in sys.modules if m.startswith('vault')})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env(PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = set(result.stdout.split())
    assert "httpx2" in loaded and "vault.client" in loaded
    server_side = {"starlette", "pymongo", "bson", "hypercorn", "middleware", "observability"}
    assert loaded & server_side == set()
    assert {m for m in loaded if m.startswith("vault.")} == {"vault.client", "vault.errors"}


# --- round trips against a real server ------------------------------------------------------


def test_round_trip_with_a_receipt(server: Any) -> None:
    secret = b"\x00db password\xff" + os.urandom(32)
    with Client(server.url) as vault:
        plain = vault.create(b"no lifecycle")
        assert plain == Created(plain.secret_id)
        assert str(uuid.UUID(plain.secret_id)) == plain.secret_id
        assert vault.fetch(plain.secret_id) == Fetched(b"no lifecycle")

        before = dt.datetime.now(dt.UTC).replace(microsecond=0)
        made = vault.create(secret, ttl_seconds=3600, max_reads=2, receipt=True, label="db")
        assert made.reads_left == 2 and made.readers is None
        assert made.expires_at is not None and made.receipt_id is not None
        assert before + dt.timedelta(hours=1) <= made.expires_at
        assert made.expires_at <= dt.datetime.now(dt.UTC) + dt.timedelta(hours=1, seconds=1)
        assert set(made.answer) == {"secret_id", "expires_at", "reads_left", "receipt_id"}

        first = vault.status(made.receipt_id)
        assert (first.state, first.label, first.reads, first.max_reads) == ("active", "db", 0, 2)
        assert first.expires_at == made.expires_at and first.first_read_at is None
        assert first.created_at.tzinfo is not None and first.ended_at is None

        fetched = vault.fetch(made.secret_id)
        assert fetched.secret == secret and fetched.reads_left == 1
        assert fetched.expires_at == made.expires_at
        assert secret not in repr(fetched).encode() and "secret=" not in repr(fetched)
        assert vault.fetch(made.secret_id).reads_left == 0
        with pytest.raises(NotFound):
            vault.fetch(made.secret_id)

        used = vault.status(made.receipt_id)
        assert (used.state, used.reads, used.reads_left) == ("used_up", 2, 0)
        assert used.first_read_at is not None and used.last_read_at is not None
        assert used.ended_at == used.last_read_at

        assert vault.delete(plain.secret_id) is None
        with pytest.raises(NotFound):
            vault.delete(plain.secret_id)


@pytest.mark.anyio
async def test_async_round_trip_with_a_receipt(server: Any) -> None:
    secret = os.urandom(64)
    async with AsyncClient(server.url) as vault:
        made = await vault.create(secret, max_reads=3, receipt=True, label="async")
        assert made.reads_left == 3 and made.receipt_id is not None
        fetched = await vault.fetch(made.secret_id)
        assert (fetched.secret, fetched.reads_left) == (secret, 2)
        status = await vault.status(made.receipt_id)
        assert (status.state, status.reads, status.label) == ("active", 1, "async")
        assert await vault.delete(made.secret_id) is None
        assert (await vault.status(made.receipt_id)).state == "deleted"
        with pytest.raises(NotFound) as gone:
            await vault.fetch(made.secret_id)
        assert gone.value.status == 404 and gone.value.attempts == 1


def test_readers_and_the_token_from_the_environment(guarded: Any) -> None:
    env = {"SECRET_MANAGER_URL": guarded.url, "SECRET_MANAGER_TOKEN": TOKENS["acme/ci"] + "\r"}
    with Client(environ=env) as ci:
        assert ci.url == guarded.url
        made = ci.create(b"for billing", readers=["billing"])
        assert made.readers == ("billing",)
        with pytest.raises(NotFound):  # the creator is no reader
            ci.fetch(made.secret_id)
    with Client(guarded.url, TOKENS["acme/billing"]) as billing:
        fetched = billing.fetch(made.secret_id)
        assert (fetched.secret, fetched.readers) == (b"for billing", ("billing",))
    with Client(guarded.url, TOKENS["acme/ci"]) as ci, pytest.raises(TypeError):
        ci.create(b"x", readers="billing")  # a string is not a list of names


# --- typed errors ---------------------------------------------------------------------------


def _raised(kind: type[ClientError], call: Callable[[], object]) -> ClientError:
    with pytest.raises(kind) as caught:
        call()
    error = caught.value
    assert type(error) is kind
    assert error.attempts == 1  # none of these is retried
    assert error.request_id is not None and REQUEST_ID.fullmatch(error.request_id)
    assert str(error) == f"HTTP {error.status}: {error.detail}"
    return error


def test_each_refusal_is_its_typed_error_with_detail_and_request_id(guarded: Any) -> None:
    anonymous = Client(guarded.url, environ={})
    unauthorized = _raised(Unauthorized, lambda: anonymous.create(b"x"))
    assert unauthorized.status == 401

    ci = Client(guarded.url, TOKENS["acme/ci"])
    made = ci.create(b"x")
    missing = _raised(NotFound, lambda: ci.fetch(str(uuid.uuid4())))
    assert missing.status == 404
    assert missing.detail == "no secret has this secret_id; check the id you were given"
    malformed = _raised(BadRequest, lambda: ci.fetch("not-a-uuid"))
    assert malformed.status == 400 and "secret_id must be a UUID" in malformed.detail
    too_many = _raised(BadRequest, lambda: ci.create(b"x", max_reads=0))
    assert "max_reads" in too_many.detail
    empty = _raised(BadRequest, lambda: ci.create(b""))
    assert empty.status == 400
    unknown_reader = _raised(BadRequest, lambda: ci.create(b"x", readers=["nobody"]))
    assert "nobody" in unknown_reader.detail
    no_receipt = _raised(NotFound, lambda: ci.status(str(uuid.uuid4())))
    assert "receipt" in no_receipt.detail

    billing = Client(guarded.url, TOKENS["acme/billing"])  # may fetch and delete only
    forbidden = _raised(Forbidden, lambda: billing.create(b"x"))
    assert forbidden.status == 403 and "create" in forbidden.detail
    _raised(Forbidden, lambda: billing.status(str(uuid.uuid4())))
    assert ci.fetch(made.secret_id).secret == b"x"  # the refusals changed nothing
    for client in (anonymous, ci, billing):
        client.close()


def test_every_error_is_one_of_the_packages() -> None:
    for kind in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict, RateLimited):
        assert issubclass(kind, ClientError)
    assert issubclass(Unavailable, ClientError) and issubclass(UnexpectedAnswer, ClientError)
    assert issubclass(ClientError, VaultError)
    # A client's setting that cannot be used is a setting error, and a ValueError.
    assert issubclass(ConfigurationError, ConfigError)
    assert issubclass(ConfigurationError, ValueError)


def test_a_url_or_token_that_cannot_be_used_is_refused_before_any_request() -> None:
    for url in ("ftp://example", "http://127.0.0.1:abc", "http://[::1", "http://", "example"):
        with pytest.raises(ConfigurationError, match=r"^url "):
            Client(url)
    with pytest.raises(ConfigurationError, match=r"^SECRET_MANAGER_URL "):
        Client(environ={"SECRET_MANAGER_URL": "localhost:8000"})
    secret_token = "t0ken-" + "x" * 40
    for bad in (secret_token + "\x7f!", "", "bad token" + "x" * 40):
        with pytest.raises(ConfigurationError, match=r"^token: ") as refused:
            Client("http://127.0.0.1:1", bad)
        assert "x" * 20 not in str(refused.value)
        with pytest.raises(ConfigurationError, match=r"^SECRET_MANAGER_TOKEN: ") as refused:
            Client("http://127.0.0.1:1", environ={"SECRET_MANAGER_TOKEN": bad or "é"})
        assert "x" * 20 not in str(refused.value)
    with pytest.raises(ConfigurationError, match="max_attempts"):
        Client("http://127.0.0.1:1", max_attempts=0)
    with pytest.raises(ConfigurationError, match="max_total_seconds"):
        Client("http://127.0.0.1:1", max_total_seconds=0)
    assert "x" * 20 not in repr(Client("http://127.0.0.1:1", secret_token))


def test_the_defaults_are_the_commands_own() -> None:
    """The client reads the variables the commands read, with the same defaults, and takes
    every token they take (it leaves the length to the server)."""
    assert Client(environ={}).url == DEFAULT_URL == SECRET_MANAGER_URL.default
    token = "a-Z0._~+/" + "t" * 30 + "=="
    assert client_token({"SECRET_MANAGER_TOKEN": token}) == token
    with Client(environ={"SECRET_MANAGER_TOKEN": f" {token}\n"}) as vault:
        assert vault._token == token
    assert Client(environ={"SECRET_MANAGER_TOKEN": " "})._token is None


def test_an_answer_that_is_not_the_apis_is_unexpected(scripted: Callable[..., Scripted]) -> None:
    html = scripted([Answer(200, {"Content-Type": "text/html"}, b"<html>proxy</html>")])
    with Client(html.url) as vault, pytest.raises(UnexpectedAnswer, match="not JSON"):
        vault.fetch(str(uuid.uuid4()))
    wrong = scripted([Answer(200, {}, b'{"secret": 42}')])
    with Client(wrong.url) as vault, pytest.raises(UnexpectedAnswer, match="'secret'"):
        vault.fetch(str(uuid.uuid4()))


# --- retries --------------------------------------------------------------------------------


def test_a_create_retried_after_503_waits_retry_after_and_keeps_its_key(
    server: Any, scripted: Callable[..., Scripted]
) -> None:
    front = scripted([busy(503), busy(503), PROXY], server.url)
    started = time.monotonic()
    with Client(front.url) as vault:
        made = vault.create(b"once", max_reads=1)
    took = time.monotonic() - started
    print(f"\n503 Retry-After: 1 timeline (s): {timeline(front)}; call took {took:.3f} s")
    assert len(front.seen) == 3
    for gap in front.gaps():
        assert 1.0 <= gap < 1.5, front.gaps()
    keys = front.keys()
    assert keys[0] is not None and len(set(keys)) == 1
    assert uuid.UUID(keys[0]).version == 4
    with Client(server.url) as vault:
        assert vault.fetch(made.secret_id).secret == b"once"
        # Another call, another key.
    again = scripted([PROXY], server.url)
    with Client(again.url) as vault:
        vault.create(b"twice")
    assert again.keys()[0] not in (None, keys[0])


@pytest.mark.parametrize("op", ["create", "fetch", "delete", "status"])
def test_429_is_retried_after_retry_after_by_every_operation(
    server: Any, scripted: Callable[..., Scripted], op: str
) -> None:
    with Client(server.url) as direct:
        made = direct.create(b"limited", receipt=True)
    front = scripted([busy(429), busy(429), PROXY], server.url)
    with Client(front.url) as vault:
        if op == "create":
            vault.create(b"limited")
        elif op == "fetch":
            assert vault.fetch(made.secret_id).secret == b"limited"
        elif op == "delete":
            vault.delete(made.secret_id)
        else:
            assert made.receipt_id is not None
            assert vault.status(made.receipt_id).state == "active"
    assert len(front.seen) == 3
    for gap in front.gaps():
        assert 1.0 <= gap < 1.5, front.gaps()
    assert (len(set(front.keys())) == 1) and ((front.keys()[0] is None) == (op != "create"))


def test_the_real_servers_own_429_is_waited_out(
    start_server: Callable[..., ServerProcess], tmp_path: Path, master_key: str
) -> None:
    limited = start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "d"), "RATE_LIMIT": "2/second"}
    )
    with Client(limited.url) as vault:
        made = vault.create(b"x", max_reads=4)
        # A third and a fourth call in one second are refused with 429 and Retry-After;
        # the client waits and each read is spent once.
        lefts = [vault.fetch(made.secret_id).reads_left for _ in range(3)]
    assert lefts == [3, 2, 1]


def test_retry_after_past_the_time_budget_gives_up_at_once(
    scripted: Callable[..., Scripted],
) -> None:
    for answer, kind in ((busy(503, "60"), Unavailable), (busy(429, "60"), RateLimited)):
        front = scripted([answer])
        started = time.monotonic()
        with Client(front.url, max_total_seconds=5) as vault, pytest.raises(kind) as refused:
            vault.create(b"x")
        assert time.monotonic() - started < 1.0
        assert len(front.seen) == 1
        error = refused.value
        assert isinstance(error, Unavailable | RateLimited)
        assert (error.retry_after, error.attempts, error.request_id) == (60.0, 1, "f" * 32)
        assert error.detail == f"busy ({error.status})"


def test_the_time_budget_and_the_attempts_both_bound_a_call(
    scripted: Callable[..., Scripted],
) -> None:
    # Retry-After: 1 each time, 2.5 s budget: attempts at 0, 1 and 2 s; a wait to 3 s would
    # end past the budget, so the third answer is final.
    front = scripted([busy(503)])
    started = time.monotonic()
    with Client(front.url, max_total_seconds=2.5) as vault, pytest.raises(Unavailable) as out:
        vault.fetch(str(uuid.uuid4()))
    took = time.monotonic() - started
    assert len(front.seen) == 3 and out.value.attempts == 3 and 2.0 <= took < 2.5
    # Retry-After: 0, three attempts allowed: three requests, then the error.
    now = scripted([busy(429, "0")])
    with Client(now.url, max_attempts=3) as vault, pytest.raises(RateLimited) as limited:
        vault.fetch(str(uuid.uuid4()))
    assert len(now.seen) == 3 and limited.value.attempts == 3
    # Without Retry-After: backoff, growing.
    bare = scripted([busy(503, None)])
    with (
        Client(bare.url, max_attempts=4, backoff_seconds=0.2) as vault,
        pytest.raises(Unavailable),
    ):
        vault.fetch(str(uuid.uuid4()))
    gaps = bare.gaps()
    assert len(gaps) == 3
    for n, gap in enumerate(gaps):  # between half and all of 0.2 * 2**n
        assert 0.1 * 2**n <= gap < 0.2 * 2**n + 0.15, gaps


@pytest.mark.parametrize("drop", [CLOSE, RESET])
def test_a_fetch_or_delete_the_server_may_have_acted_on_is_not_retried(
    scripted: Callable[..., Scripted], drop: str
) -> None:
    for op in ("fetch", "delete"):
        front = scripted([drop, busy(503)])
        with Client(front.url) as vault, pytest.raises(Unavailable) as failed:
            getattr(vault, op)(str(uuid.uuid4()))
        assert len(front.seen) == 1, op
        error = failed.value
        assert (error.status, error.attempts) == (None, 1)
        assert str(error).startswith(f"no answer from {front.url}: ")
        assert str(error).endswith(f"; the {op} may have been carried out")


def test_a_fetch_that_timed_out_waiting_for_its_answer_is_not_retried(
    scripted: Callable[..., Scripted],
) -> None:
    front = scripted([Stall(2.0), busy(503)])
    with Client(front.url, timeout=0.5) as vault, pytest.raises(Unavailable):
        vault.fetch(str(uuid.uuid4()))
    assert len(front.seen) == 1


@pytest.mark.parametrize("drop", [CLOSE, RESET, Stall(1.5)])
def test_a_create_is_retried_after_the_connection_failed_mid_request_with_its_key(
    server: Any, scripted: Callable[..., Scripted], drop: Step
) -> None:
    front = scripted([drop, PROXY], server.url)
    with Client(front.url, timeout=0.5) as vault:
        made = vault.create(b"exactly once")
    assert len(front.seen) == 2
    keys = front.keys()
    assert keys[0] is not None and keys[0] == keys[1]
    with Client(server.url) as direct:
        assert direct.fetch(made.secret_id).secret == b"exactly once"


def test_a_status_changes_nothing_and_is_retried_like_a_create(
    server: Any, scripted: Callable[..., Scripted]
) -> None:
    with Client(server.url) as direct:
        made = direct.create(b"x", receipt=True)
    assert made.receipt_id is not None
    front = scripted([RESET, PROXY], server.url)
    with Client(front.url) as vault:
        assert vault.status(made.receipt_id).state == "active"
    assert len(front.seen) == 2 and front.keys() == [None, None]


def test_a_create_whose_first_attempt_is_still_answered_retries_the_409(
    server: Any, scripted: Callable[..., Scripted]
) -> None:
    # Our own first attempt, cut off, is still in flight: the server answers 409 to the
    # second, and the third gets the answer.
    front = scripted([RESET, busy(409, None), PROXY], server.url)
    with Client(front.url) as vault:
        vault.create(b"x")
    assert len(front.seen) == 3 and len(set(front.keys())) == 1
    # A 409 to the first attempt is someone else's key: not retried.
    other = scripted([busy(409, None), PROXY], server.url)
    with Client(other.url) as vault, pytest.raises(Conflict) as conflict:
        vault.create(b"x")
    assert len(other.seen) == 1 and conflict.value.status == 409


def test_a_fetch_is_retried_while_the_connection_is_refused(
    server: Any, scripted: Callable[..., Scripted]
) -> None:
    with Client(server.url) as direct:
        made = direct.create(b"read once", max_reads=1)
    # Nothing listens on the port for 0.6 s (a server starting up): refused, retried.
    late = scripted([PROXY], server.url, delay=0.6)
    started = time.monotonic()
    with Client(late.url) as vault:
        fetched = vault.fetch(made.secret_id)
    assert fetched.secret == b"read once" and fetched.reads_left == 0
    assert late.started_at is not None and time.monotonic() - started >= 0.6
    assert len(late.seen) == 1  # only the attempt that connected reached a server


def test_a_server_that_never_listens_is_unavailable_after_the_attempts(
    scripted: Callable[..., Scripted],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with (
        Client(url, max_attempts=3, backoff_seconds=0.1) as vault,
        pytest.raises(Unavailable) as refused,
    ):
        vault.delete(str(uuid.uuid4()))
    took = time.monotonic() - started
    error = refused.value
    assert (error.status, error.attempts, error.request_id) == (None, 3, None)
    assert "Connection refused" in error.detail and url in str(error)
    assert 0.05 + 0.1 <= took < 2  # two backoffs: 0.05-0.1 s, then 0.1-0.2 s


@pytest.mark.anyio
async def test_the_async_client_retries_alike(
    server: Any, scripted: Callable[..., Scripted]
) -> None:
    front = scripted([busy(503), RESET, PROXY], server.url)
    async with AsyncClient(front.url) as vault:
        made = await vault.create(b"async retried")
    assert len(front.seen) == 3 and len(set(front.keys())) == 1
    assert 1.0 <= front.gaps()[0] < 1.5
    fetch_front = scripted([busy(429), RESET], server.url)
    async with AsyncClient(fetch_front.url) as vault:
        with pytest.raises(Unavailable):
            await vault.fetch(made.secret_id)
    assert len(fetch_front.seen) == 2  # the 429 retried, the reset not
    async with AsyncClient(server.url) as vault:
        assert (await vault.fetch(made.secret_id)).secret == b"async retried"


# --- passphrases ----------------------------------------------------------------------------

LOCKED = 'this secret is protected by a passphrase: send it as "passphrase" in the fetch body'


def _wrong(tries_left: int) -> str:
    tries = "try" if tries_left == 1 else "tries"
    return f"the passphrase is wrong; after {tries_left} more wrong {tries} the secret is deleted"


def test_a_passphrase_round_trip_and_a_wrong_one_is_sent_once(
    server: Any, scripted: Callable[..., Scripted]
) -> None:
    passphrase = "correct horse battery staple"
    with Client(server.url) as direct:
        made = direct.create(b"behind a passphrase", passphrase=passphrase, receipt=True)
        plain = direct.create(b"no passphrase", receipt=True)
    assert made.receipt_id is not None and plain.receipt_id is not None
    assert set(made.answer) == {"secret_id", "receipt_id"}  # the answer says nothing more

    # Every request through a front that counts them, with retries allowed.
    front = scripted([PROXY], server.url)
    with Client(front.url, max_attempts=5) as vault:
        locked = _raised(Forbidden, lambda: vault.fetch(made.secret_id))
        assert locked.detail == LOCKED
        wrong = _raised(Forbidden, lambda: vault.fetch(made.secret_id, passphrase="wrong"))
        assert (wrong.status, wrong.detail) == (403, _wrong(4))
        assert len(front.seen) == 2  # one request each: neither 403 was sent again
        status = vault.status(made.receipt_id)
        # The server counted that one wrong try once, and not the missing one.
        assert (status.passphrase_failures, status.reads, status.state) == (1, 0, "active")
        # The next wrong try is told one fewer is left: the first was counted exactly once.
        again = _raised(Forbidden, lambda: vault.fetch(made.secret_id, passphrase=passphrase[:-1]))
        assert again.detail == _wrong(3)
        fetched = vault.fetch(made.secret_id, passphrase=passphrase)
        assert fetched.secret == b"behind a passphrase"
        assert set(fetched.answer) == {"secret"}
        after = vault.status(made.receipt_id)
        assert (after.passphrase_failures, after.reads) == (2, 1)
        # A secret without a passphrase: no such field.
        assert vault.status(plain.receipt_id).passphrase_failures is None
        assert "passphrase_failures" not in vault.status(plain.receipt_id).answer
    assert [json.loads(seen.body).get("passphrase") for seen in front.seen[:4]] == [
        None,
        "wrong",
        None,
        passphrase[:-1],
    ]


def test_wrong_passphrases_up_to_the_limit_delete_the_secret(server: Any) -> None:
    with Client(server.url) as vault:
        made = vault.create(b"x", passphrase="right", receipt=True)
        for left in (4, 3, 2, 1):
            with pytest.raises(Forbidden) as wrong:
                vault.fetch(made.secret_id, passphrase=f"wrong {left}")
            assert (wrong.value.detail, wrong.value.attempts) == (_wrong(left), 1)
        with pytest.raises(Forbidden) as last:
            vault.fetch(made.secret_id, passphrase="wrong 0")
        assert last.value.detail == (
            "the passphrase is wrong, and that was the last try allowed: the secret is deleted"
        )
        with pytest.raises(NotFound):  # the right one comes too late
            vault.fetch(made.secret_id, passphrase="right")
        assert made.receipt_id is not None
        gone = vault.status(made.receipt_id)
        assert (gone.state, gone.passphrase_failures, gone.reads) == ("deleted", 5, 0)


def test_a_passphrase_must_be_text(server: Any) -> None:
    with Client(server.url) as vault:
        with pytest.raises(TypeError, match="passphrase must be a str") as refused:
            vault.create(b"x", passphrase=b"bytes pass")  # type: ignore[arg-type]
        assert "bytes pass" not in str(refused.value)
        with pytest.raises(TypeError, match="passphrase must be a str"):
            vault.fetch(str(uuid.uuid4()), passphrase=1234)  # type: ignore[arg-type]
        # Its length is the server's to judge, and its 400 does not quote it.
        too_long = "p" * 1025
        with pytest.raises(BadRequest) as long:
            vault.create(b"x", passphrase=too_long)
        assert "passphrase" in long.value.detail and too_long not in str(long.value)


def test_a_create_with_a_passphrase_retried_sends_the_same_body_and_key(
    server: Any, scripted: Callable[..., Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="secret_manager.client")
    front = scripted([RESET, busy(503, "0"), PROXY], server.url)
    with Client(front.url) as vault:
        made = vault.create(b"once, under a passphrase", passphrase="s3same", max_reads=1)
    assert len(front.seen) == 3
    assert len({seen.body for seen in front.seen}) == 1  # byte for byte, passphrase included
    assert json.loads(front.seen[0].body)["passphrase"] == "s3same"
    assert front.keys()[0] is not None and len(set(front.keys())) == 1
    retries = [r.getMessage() for r in caplog.records if r.name == "secret_manager.client"]
    assert len(retries) == 2 and all("retrying" in line for line in retries)
    assert not any("s3same" in line for line in retries)  # the retries' log never shows it
    with Client(server.url) as direct:
        fetched = direct.fetch(made.secret_id, passphrase="s3same")
    assert (fetched.secret, fetched.reads_left) == (b"once, under a passphrase", 0)


@pytest.mark.anyio
async def test_async_passphrase_round_trip_and_a_wrong_one_sent_once(
    server: Any, scripted: Callable[..., Scripted]
) -> None:
    async with AsyncClient(server.url) as direct:
        made = await direct.create(b"async, under a passphrase", passphrase="é pass", receipt=True)
    assert made.receipt_id is not None
    front = scripted([PROXY], server.url)
    async with AsyncClient(front.url) as vault:
        with pytest.raises(Forbidden) as wrong:
            await vault.fetch(made.secret_id, passphrase="e pass")
        assert (wrong.value.detail, wrong.value.attempts) == (_wrong(4), 1)
        assert wrong.value.request_id is not None and REQUEST_ID.fullmatch(wrong.value.request_id)
        assert len(front.seen) == 1
        assert (await vault.status(made.receipt_id)).passphrase_failures == 1
        fetched = await vault.fetch(made.secret_id, passphrase="é pass")
    assert fetched.secret == b"async, under a passphrase"
