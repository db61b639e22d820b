"""Hostile clients against the real server (Hypercorn) over raw loopback sockets.

Slow clients (headers trickled, a promised body never sent, a body trickled) must not starve
anyone else and must be cut off by the server's own timeouts; malformed bodies, wrong
content types and protocol garbage get a 4xx, never a 5xx; every /vault answer, of every
class, carries the hygiene headers and no traceback.

The server under test gets short ``READ_TIMEOUT_SECONDS`` (the longest silence Hypercorn
waits for on a read; here also the most a request body may take to arrive) and
``KEEP_ALIVE_TIMEOUT_SECONDS`` (Hypercorn's idle timer, which also runs from the moment a
connection opens until its request head is complete) so these tests finish in seconds.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.client
import json
import re
import select
import socket
import sqlite3
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import ServerProcess, b64
from vault.cli.serve import H2_MAX_CONCURRENT_STREAMS
from vault.crypto import generate_key
from vault.records import record_key

pytestmark = pytest.mark.slow

StartServer = Callable[..., ServerProcess]

READ_TIMEOUT = 2  # READ_TIMEOUT_SECONDS of the server under test
KEEP_ALIVE = 2  # KEEP_ALIVE_TIMEOUT_SECONDS: it also bounds the wait for a request's head
SLACK = 1.5  # scheduling slack on a busy machine
TRICKLE_INTERVAL = 0.5  # one byte every this many seconds
CREATE = "/vault/secret/create"
FETCH = "/vault/secret/fetch"


def hostile_env(directory: Path) -> dict[str, str]:
    """A server with its own key and data, no rate limit, and short timeouts to probe."""
    return {
        "MASTER_KEY": generate_key(),
        "DATA_DIR": str(directory / "data"),
        "RATE_LIMIT": "off",
        "READ_TIMEOUT_SECONDS": str(READ_TIMEOUT),
        "KEEP_ALIVE_TIMEOUT_SECONDS": str(KEEP_ALIVE),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("hostile")
    process = ServerProcess(hostile_env(directory), [], directory)
    yield process
    process.stop()


# --- raw-socket helpers -----------------------------------------------------------------------


def head(path: str = CREATE, *headers: str, content_length: int | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode("latin-1")


def final_status(received: bytes) -> int | None:
    """The status of the last non-interim response in what the server sent, if any."""
    statuses = [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3})", received)]
    finals = [s for s in statuses if s >= 200]
    return finals[-1] if finals else None


def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> tuple[int | None, bytes]:
    """Send raw bytes; return the final status (None if closed without one) and the bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method="POST")
        try:
            response.begin()  # skips any 100 Continue
        except (http.client.RemoteDisconnected, ConnectionError):
            return None, b""
        except TimeoutError:
            pytest.fail(f"no answer within {timeout}s to {data[:80]!r}")
        body = response.read()
        raw = f"HTTP/1.1 {response.status}\r\n{response.headers}".encode("latin-1") + body
        return response.status, raw


@dataclass
class Held:
    """What happened to one slow connection."""

    kind: str
    opened: float
    closed_after: float | None  # seconds from opening until the server closed it
    received: bytes

    @property
    def status(self) -> int | None:
        return final_status(self.received)


def hold(kind: str, port: int, *, until: float) -> Held:
    """Open one slow connection and keep it slow until the server closes it or ``until``.

    ``headers``: the request head, one byte every TRICKLE_INTERVAL, never finished.
    ``no-body``: a complete head promising a body that is never sent.
    ``body``: a complete head, then the body one byte every TRICKLE_INTERVAL.
    """
    body = b'{"secret": "' + b"A" * 2000 + b'"}'
    if kind == "headers":
        initial = b""
        trickle = iter(
            b"POST /vault/secret/create HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000
        )
    elif kind == "no-body":
        initial, trickle = head(content_length=len(body)), iter(b"")
    elif kind == "body":
        initial, trickle = head(content_length=len(body)), iter(body)
    else:  # pragma: no cover - a typo in a test
        raise ValueError(kind)

    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    opened = time.monotonic()
    received = b""
    closed_after = None
    try:
        sock.sendall(initial)
        while time.monotonic() < until:
            readable, _, _ = select.select([sock], [], [], TRICKLE_INTERVAL)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except OSError:  # reset by the server
                    chunk = b""
                if not chunk:
                    closed_after = time.monotonic() - opened
                    break
                received += chunk
                continue
            byte = next(trickle, None)
            if byte is not None:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    closed_after = time.monotonic() - opened
                    break
    finally:
        sock.close()
    return Held(kind, opened, closed_after, received)


def server_errors(url: str) -> float:
    """Requests the server itself counted as 5xx (what the 5xx-ratio alert watches)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(
        float(value)
        for value in re.findall(
            r'^http_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)$', text, re.M
        )
    )


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if '"level": "ERROR"' in line]


def create(client: httpx.Client, secret: str) -> str:
    response = client.post(CREATE, json={"secret": secret})
    assert response.status_code == 200, response.text
    return str(response.json()["secret_id"])


# --- slow clients -----------------------------------------------------------------------------


def test_slow_clients_do_not_starve_others(server: ServerProcess) -> None:
    kinds = ["headers"] * 7 + ["no-body"] * 7 + ["body"] * 6
    timings: list[float] = []
    with ThreadPoolExecutor(len(kinds)) as pool:
        until = time.monotonic() + max(READ_TIMEOUT, KEEP_ALIVE) + SLACK
        held = [pool.submit(hold, kind, server.port, until=until) for kind in kinds]
        time.sleep(0.5)  # all twenty connected and being slow
        started = time.monotonic()
        for _ in range(3):
            plaintext = uuid.uuid4().bytes
            # A fresh connection for each call, as a new client would open.
            begin = time.perf_counter()
            response = httpx.post(server.url + CREATE, json={"secret": b64(plaintext)}, timeout=5)
            timings.append(time.perf_counter() - begin)
            assert response.status_code == 200, response.text
            begin = time.perf_counter()
            fetched = httpx.post(
                server.url + FETCH, json={"secret_id": response.json()["secret_id"]}, timeout=5
            )
            timings.append(time.perf_counter() - begin)
            assert base64.b64decode(fetched.json()["secret"]) == plaintext
        measured = time.monotonic()
        results = [future.result() for future in held]

    assert all(r.opened < started for r in results), "the slow connections were not all open"
    # Every one of them was still open (still slow) while the normal calls were answered.
    still_open = [
        r for r in results if r.closed_after is None or r.opened + r.closed_after > measured
    ]
    assert len(still_open) == len(kinds), [(r.kind, r.closed_after) for r in results]
    assert max(timings) < 1.0, f"normal calls took {[round(t, 3) for t in timings]} s"


SLOW_KINDS: dict[str, tuple[float, str, int | None]] = {
    # kind: (the server must have closed it within this many seconds, what bounds it, the
    # status it answers first: None when it closes without a word, as before a request head)
    "headers": (KEEP_ALIVE + SLACK, "KEEP_ALIVE_TIMEOUT_SECONDS (the header phase)", None),
    "no-body": (READ_TIMEOUT + SLACK, "READ_TIMEOUT_SECONDS", 408),
    "body": (READ_TIMEOUT + SLACK, "READ_TIMEOUT_SECONDS (whole body)", 408),
}


@pytest.mark.parametrize("kind", list(SLOW_KINDS))
def test_slow_connections_are_cut_off_by_the_server(server: ServerProcess, kind: str) -> None:
    limit, bound, status = SLOW_KINDS[kind]
    before_errors = server_errors(server.url)
    with ThreadPoolExecutor(3) as pool:
        until = time.monotonic() + limit
        futures = [pool.submit(hold, kind, server.port, until=until) for _ in range(3)]
        results = [future.result() for future in futures]
    for result in results:
        assert result.closed_after is not None, (
            f"a {kind!r} slow client was still connected after {limit}s; expected the server to "
            f"close it within {bound}"
        )
        # The client's fault (408) once there is a request to answer, never a 5xx.
        assert result.status == status, result.received[:300]
    assert server_errors(server.url) == before_errors


def test_a_client_that_goes_away_is_not_a_server_error(server: ServerProcess) -> None:
    """Aborted uploads must not raise the 5xx ratio (an alert) nor log errors."""
    time.sleep(0.2)
    before_errors = server_errors(server.url)
    before_log = len(server.output())
    body = b'{"secret": "' + b"A" * 100 + b'"}'
    aborts = [
        head(content_length=len(body)),  # the head, then gone
        head(content_length=len(body)) + body[:20],  # half the body, then gone
        head(FETCH, content_length=len(body)) + body[:5],
    ]
    for data in aborts:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(data)
            time.sleep(0.1)  # the app is waiting for the body
    # A chunked body that turns out malformed: Hypercorn answers 400 and drops the request.
    malformed = (
        head("/vault/secret/create", "Transfer-Encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n"
    )
    status, _ = exchange(server.port, malformed)
    assert status == 400
    time.sleep(0.5)  # let the server notice and log

    assert server_errors(server.url) == before_errors, "client aborts were counted as 5xx"
    new_errors = error_lines(server.output()[before_log:])
    assert not new_errors, "client aborts were logged as errors:\n" + "\n".join(new_errors)


# --- malformed bodies -------------------------------------------------------------------------

MALFORMED: dict[str, tuple[str, bytes]] = {
    # name: (path, body); every one must be answered 400 with a JSON detail.
    "invalid UTF-8 in the secret": (CREATE, b'{"secret": "\xff\xfe"}'),
    "invalid UTF-8 in an ignored field": (CREATE, b'{"secret": "aGk=", "note": "\xc3\x28"}'),
    "overlong UTF-8": (CREATE, b'{"secret": "aGk=", "note": "\xc0\xaf"}'),
    "UTF-8-encoded surrogate (CESU)": (CREATE, b'{"secret": "aGk=", "note": "\xed\xa0\x80"}'),
    "lone surrogate escape in the secret": (CREATE, b'{"secret": "\\ud800"}'),
    "lone surrogate escape in an ignored field": (CREATE, b'{"secret": "aGk=", "n": "\\udfff"}'),
    "lone surrogate escape in a key": (CREATE, b'{"secret": "aGk=", "\\ud800": 1}'),
    "lone surrogate escape in the secret_id": (FETCH, b'{"secret_id": "\\ud800"}'),
    "UTF-16 body": (CREATE, '{"secret": "aGk="}'.encode("utf-16")),
    "100k opening brackets": (CREATE, b"[" * 100_000),
    "deep nesting in an ignored field": (
        CREATE,
        b'{"secret": "aGk=", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ),
    "deeply nested objects": (CREATE, b'{"a":' * 20_000),
    "duplicate secret": (CREATE, b'{"secret": "aGk=", "secret": "aGk="}'),
    "duplicate secret, different values": (CREATE, b'{"secret": "aGk=", "secret": "aGV5"}'),
    "duplicate secret_id": (
        FETCH,
        b'{"secret_id": "00000000-0000-4000-8000-000000000000",'
        b' "secret_id": "00000000-0000-4000-8000-000000000001"}',
    ),
    "huge integer as the secret": (CREATE, b'{"secret": ' + b"9" * 50_000 + b"}"),
    "huge integer in an ignored field": (
        CREATE,
        b'{"secret": "aGk=", "n": ' + b"9" * 50_000 + b"}",
    ),
    "float overflowing to infinity": (CREATE, b'{"secret": "aGk=", "n": 1e999999}'),
    "negative float overflow": (CREATE, b'{"secret": "aGk=", "n": -1e999999}'),
    "NaN as the secret": (CREATE, b'{"secret": NaN}'),
    "NaN in an ignored field": (CREATE, b'{"secret": "aGk=", "n": NaN}'),
    "Infinity in an ignored field": (CREATE, b'{"secret": "aGk=", "n": Infinity}'),
    "-Infinity in an ignored field": (CREATE, b'{"secret": "aGk=", "n": -Infinity}'),
    "NaN as the secret_id": (FETCH, b'{"secret_id": NaN}'),
    "empty body": (CREATE, b""),
    "whitespace only": (CREATE, b" \r\n\t"),
    "JSON null": (CREATE, b"null"),
    "JSON array": (CREATE, b'[{"secret": "aGk="}]'),
    "JSON string": (CREATE, b'"aGk="'),
    "trailing garbage": (CREATE, b'{"secret": "aGk="} x'),
    "two documents": (CREATE, b'{"secret": "aGk="}{"secret": "aGk="}'),
    "NUL in the secret": (CREATE, b'{"secret": "aGk=\\u0000"}'),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_bodies_are_400_never_5xx(server: ServerProcess, name: str) -> None:
    path, body = MALFORMED[name]
    response = httpx.post(
        server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert response.headers["cache-control"] == "no-store"
    assert "Traceback" not in response.text


# --- content types ----------------------------------------------------------------------------

REFUSED_TYPES = [
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/xml",
    "application/octet-stream",
    "application/json; charset=iso-8859-1",
    "application/json; charset=utf-16",
]
ACCEPTED_TYPES = [
    None,  # no Content-Type at all: old clients that never set one keep working
    "application/json",
    "application/json; charset=utf-8",
    "application/json;charset=UTF-8",
    'Application/JSON; Charset="utf-8"',
]


@pytest.mark.parametrize("path", [CREATE, FETCH])
@pytest.mark.parametrize("content_type", REFUSED_TYPES)
def test_a_wrong_content_type_is_415_with_a_detail(
    server: ServerProcess, content_type: str, path: str
) -> None:
    payload: dict[str, str] = (
        {"secret": "aGk="} if path == CREATE else {"secret_id": str(uuid.uuid4())}
    )
    response = httpx.post(
        server.url + path,
        content=json.dumps(payload).encode(),
        headers={"Content-Type": content_type},
        timeout=10,
    )
    assert response.status_code == 415, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert "application/json" in detail, "the detail should say which content type to send"


@pytest.mark.parametrize("content_type", ACCEPTED_TYPES)
def test_json_content_types_and_none_are_accepted(
    server: ServerProcess, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.post(CREATE, content=b'{"secret": "aGk="}', headers=headers)
        assert response.status_code == 200, response.text
        fetched = client.post(
            FETCH,
            content=json.dumps({"secret_id": response.json()["secret_id"]}).encode(),
            headers=headers,
        )
    assert fetched.json() == {"secret": "aGk="}


# --- protocol-level garbage -------------------------------------------------------------------

BODY = b'{"secret": "aGk="}'
GARBAGE: dict[str, tuple[int, bytes]] = {
    # name: (the status it gets, the bytes sent). Framing errors are Hypercorn's 400; what
    # parses is answered by the app like any request.
    "header line without a colon": (
        400,
        b"POST /vault/secret/create HTTP/1.1\r\nHost: x\r\nBad\r\n\r\n",
    ),
    "non-numeric Content-Length": (
        400,
        b"POST /vault/secret/create HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ),
    "enormous Content-Length": (
        400,
        b"POST /vault/secret/create HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 99999999999999999999999\r\n\r\n",
    ),
    "conflicting Content-Lengths": (
        400,
        b"POST /vault/secret/create HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 5\r\nContent-Length: 18\r\n\r\n" + BODY,
    ),
    "malformed chunk size": (
        400,
        b"POST /vault/secret/create HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + BODY + b"\r\n0\r\n\r\n",
    ),
    "a 20 KB header": (
        200,
        b"POST /vault/secret/create HTTP/1.1\r\nHost: x\r\nX-Big: "
        + b"a" * 20_000
        + b"\r\nContent-Length: 18\r\n\r\n"
        + BODY,
    ),
    "Latin-1 bytes in User-Agent": (
        200,
        b"POST /vault/secret/create HTTP/1.1\r\nHost: x\r\n"
        b"User-Agent: \xff\xfe\x80\r\nContent-Length: 18\r\n\r\n" + BODY,
    ),
    "garbage X-Forwarded-For and X-Request-ID": (
        200,
        b"POST /vault/secret/create HTTP/1.1\r\n"
        b"Host: x\r\nX-Forwarded-For: \xff, ::::, 999.1.1.1\r\nX-Request-ID: \xff\r\n"
        b"Content-Length: 18\r\n\r\n" + BODY,
    ),
    "NUL in the path": (
        404,
        b"POST /vault/secret/create%00 HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n" + BODY,
    ),
    "path traversal under /docs/assets": (
        404,
        b"GET /docs/assets/..%2f..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    "HTTP/1.0 without Host": (
        200,
        b"POST /vault/secret/create HTTP/1.0\r\nContent-Length: 18\r\n\r\n" + BODY,
    ),
    "unknown method": (405, b"FOO /vault/secret/create HTTP/1.1\r\nHost: x\r\n\r\n"),
    # Hypercorn hands the whole absolute-form target to the app as its path, so no route
    # matches it (RFC 9112 section 3.2.2 would route it on its path part).
    "absolute-form target": (
        404,
        b"POST http://elsewhere/vault/secret/create HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 18\r\n\r\n" + BODY,
    ),
    "OPTIONS *": (404, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_protocol_garbage_is_never_a_server_error(server: ServerProcess, name: str) -> None:
    expected, request = GARBAGE[name]
    status, raw = exchange(server.port, request)
    assert status == expected, raw[:400]
    assert b"Traceback" not in raw
    assert not re.search(rb"^server:", raw, re.I | re.M), raw[:400]


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n",  # obs-fold
    ],
    ids=["CL+TE", "TE+CL", "CL+folded-TE"],
)
def test_two_body_framings_are_refused_and_nothing_after_them_is_served(
    server: ServerProcess, framing: bytes
) -> None:
    # A proxy honouring Content-Length would forward the GET as part of this body; a server
    # honouring the chunked framing, and keeping the connection, would answer it too.
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    data = (
        b"POST /vault/secret/create HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n" + framing + b"\r\n0\r\n\r\n" + smuggled
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):  # until the server closes the connection
                received += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3})", received)
    assert statuses == [b"400"], received[:600]
    assert b"Content-Length and Transfer-Encoding" in received


# Hypercorn 0.18 (protocol/http_stream.py) blocks putting http.disconnect into a full
# receive queue when the app answers before reading a chunked body, and the connection was
# never released; the body limit now discards what is queued while its 413 goes out.
def test_chunked_uploads_over_the_cap_leave_nothing_behind(
    start_server: StartServer, tmp_path: Path, master_key: str
) -> None:
    """Each refused upload must free its connection: none may stay open (a file descriptor and
    its buffers, held until shutdown) nor hold up a graceful stop."""
    server = start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data"), "RATE_LIMIT": "off"}
    )
    fd_dir = Path(f"/proc/{server.process.pid}/fd")

    def open_fds() -> int:
        return len(list(fd_dir.iterdir())) if fd_dir.exists() else 0

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"A" * 16_384

    before = open_fds()
    for _ in range(20):
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.post(CREATE, content=chunks()).status_code == 413
    time.sleep(0.5)
    leaked = open_fds() - before
    started = time.monotonic()
    assert server.stop() == 0
    stopped_after = time.monotonic() - started
    assert leaked < 5, f"{leaked} connections left open by 20 refused uploads"
    assert stopped_after < 3, f"stopping took {stopped_after:.1f}s with nothing in flight"


def test_an_announced_oversized_body_is_refused_before_it_is_sent(server: ServerProcess) -> None:
    """Expect: 100-continue with a Content-Length over the cap: 413 without the body."""
    data = head("/vault/secret/create", "Expect: 100-continue", content_length=10_000_000)
    started = time.monotonic()
    status, raw = exchange(server.port, data, timeout=READ_TIMEOUT + SLACK)
    assert status == 413, raw[:400]
    assert time.monotonic() - started < 1.0


# --- HTTP/2: refused on the plain port, served over TLS (ALPN h2) -----------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The same server serving HTTPS itself (TLS_CERT_FILE): HTTP/2 is chosen there by ALPN."""
    directory = tmp_path_factory.mktemp("hostile-tls")
    process = ServerProcess(hostile_env(directory), [], directory, tls=True)
    yield process
    process.stop()


STREAM_CAP = H2_MAX_CONCURRENT_STREAMS  # Hypercorn's h2_max_concurrent_streams, from serve


def h2_headers(path: str, method: str = "POST", *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        (":method", method), (":path", path), (":scheme", "https"), (":authority", "localhost"),
        *([("content-type", "application/json")] if method == "POST" else []), *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def h2_connection(server: ServerProcess, *, timeout: float) -> Iterator[tuple[ssl.SSLSocket, Any]]:
    """One HTTP/2 connection to ``server`` over TLS (ALPN h2), the client's preface sent."""
    import h2.config
    import h2.connection

    context = ssl.create_default_context(cafile=server.env["TLS_CERT_FILE"])
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        yield sock, conn


def h2_receive(sock: ssl.SSLSocket, conn: Any) -> list[Any] | None:
    """The h2 events of what the server sends next; None once it has closed the connection."""
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        data = b""
    if not data:
        return None
    events: list[Any] = conn.receive_data(data)
    with contextlib.suppress(OSError):  # closed meanwhile: the next read says so
        sock.sendall(conn.data_to_send())
    return events


def test_the_plain_port_refuses_http2_with_prior_knowledge(server: ServerProcess) -> None:
    """Behind the edge the service speaks HTTP/1.1 only: HTTP/2's preface in clear text gets
    an HTTP/1.1 505 and the connection closed, before any app runs."""
    import h2.config
    import h2.connection

    before_log = len(server.output())
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, h2_headers("/healthz", "GET"), end_stream=True)
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(conn.data_to_send())
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 505 "), received
    assert b"connection: close" in received.lower()
    # What an HTTP/2 client with prior knowledge makes of it: a clear failure.
    with (
        httpx.Client(base_url=server.url, http1=False, http2=True, timeout=5) as client,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        client.get("/healthz")
    time.sleep(0.2)
    assert not error_lines(server.output()[before_log:])


def test_the_plain_port_answers_an_h2c_upgrade_in_http1(server: ServerProcess) -> None:
    """``Upgrade: h2c`` is ignored (RFC 9110 7.8): the request is answered in HTTP/1.1, never
    switched (behind an HTTP/1.1 proxy, a switch would be a tunnel past it)."""
    import h2.config
    import h2.connection

    before_log = len(server.output())
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = base64.urlsafe_b64encode(conn.initiate_upgrade_connection()).rstrip(b"=")
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n"
    )
    status, raw = exchange(server.port, request)
    assert status == 200, raw[:400]
    assert raw.startswith(b"HTTP/1.1 200"), raw[:400]
    time.sleep(0.2)
    assert not error_lines(server.output()[before_log:])


def test_http2_clients_get_the_same_answers(tls_server: ServerProcess) -> None:
    with httpx.Client(
        base_url=tls_server.url, http1=False, http2=True, verify=tls_server.tls, timeout=10
    ) as client:
        created = client.post(CREATE, json={"secret": "aGk="})
        assert created.http_version == "HTTP/2"
        assert created.status_code == 200, created.text
        assert created.headers["cache-control"] == "no-store"
        assert "server" not in created.headers
        fetched = client.post(FETCH, json={"secret_id": created.json()["secret_id"]})
        assert fetched.json() == {"secret": "aGk="}


# Hypercorn 0.18 (protocol/h2.py) raised KeyError on data for a stream already answered and
# dropped the connection; vault/hypercorn_fixes.py resets such a stream (NO_ERROR) instead.
def test_http2_body_over_the_cap_is_413_not_a_broken_connection(tls_server: ServerProcess) -> None:
    # Several tries and sizes: the failure was a race between the early answer and the upload.
    before_log = len(tls_server.output())
    outcomes = []
    for size in (200_000, 300_000, 200_000, 300_000, 200_000):
        with httpx.Client(
            base_url=tls_server.url, http1=False, http2=True, verify=tls_server.tls, timeout=5
        ) as client:
            try:
                response = client.post(CREATE, content=b"x" * size)
                outcomes.append(str(response.status_code))
                assert "detail" in response.json()
                assert "connection" not in response.headers
                # The same connection still serves the next request.
                assert client.post(CREATE, json={"secret": "aGk="}).status_code == 200
            except httpx.TransportError as exc:
                outcomes.append(repr(exc))
    assert outcomes == ["413"] * 5, outcomes
    time.sleep(0.2)
    assert not error_lines(tls_server.output()[before_log:])


def _h2_post(sock: ssl.SSLSocket, conn: Any, stream_id: int, body: bytes) -> list[Any]:
    """Send a POST on ``stream_id`` (as much body as the server lets in) and return the
    h2 events until the stream ends or is reset."""
    import h2.events

    conn.send_headers(stream_id, h2_headers(CREATE))
    sock.sendall(conn.data_to_send())
    events: list[Any] = []
    sent = 0
    done = False
    while not done:
        window = conn.local_flow_control_window(stream_id) if sent < len(body) else 0
        if window > 0:
            chunk = body[sent : sent + min(window, conn.max_outbound_frame_size)]
            sent += len(chunk)
            conn.send_data(stream_id, chunk, end_stream=sent == len(body))
            sock.sendall(conn.data_to_send())
            if not sock.pending() and not select.select([sock], [], [], 0)[0]:
                continue
        received = h2_receive(sock, conn)
        assert received is not None, "the server closed the connection"
        for event in received:
            events.append(event)
            if getattr(event, "stream_id", None) != stream_id:
                continue
            # Over once reset, or once answered after the whole body went out.
            ended = isinstance(event, h2.events.StreamEnded) and sent == len(body)
            done = done or ended or isinstance(event, h2.events.StreamReset)
    return events


def test_an_http2_upload_far_over_the_cap_is_answered_and_reset_not_a_broken_connection(
    tls_server: ServerProcess,
) -> None:
    """Past what the body limit reads before answering, the answer goes out at once and the
    stream is reset with NO_ERROR (RFC 9113 8.1); the connection keeps serving."""
    import h2.errors
    import h2.events

    before_log = len(tls_server.output())
    with h2_connection(tls_server, timeout=10) as (sock, conn):
        conn.increment_flow_control_window(2**24)
        sock.sendall(conn.data_to_send())
        events = _h2_post(sock, conn, 1, b"x" * 3_000_000)
        statuses = [dict(e.headers)[b":status"] for e in events
                    if isinstance(e, h2.events.ResponseReceived)]  # fmt: skip
        assert statuses == [b"413"], events
        resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
        assert resets and resets[0].error_code == h2.errors.ErrorCodes.NO_ERROR, events
        # The same connection serves the next request.
        again = _h2_post(sock, conn, 3, b'{"secret": "aGk="}')
        statuses = [dict(e.headers)[b":status"] for e in again
                    if isinstance(e, h2.events.ResponseReceived)]  # fmt: skip
        assert statuses == [b"200"], again
    time.sleep(0.2)
    assert not error_lines(tls_server.output()[before_log:])


# Hypercorn 0.18 (protocol/h2.py) left a stream waiting forever for its send buffer once the
# connection had closed: the 408's stream never ended, nor did the connection's task.
def test_an_http2_stream_whose_body_never_comes_gets_408_and_its_connection_ends(
    tls_server: ServerProcess,
) -> None:
    import h2.events

    with h2_connection(tls_server, timeout=1) as (sock, conn):
        conn.send_headers(1, h2_headers(CREATE))
        sock.sendall(conn.data_to_send())  # and no body, ever
        opened, statuses, closed_after = time.monotonic(), [], None
        limit = READ_TIMEOUT + KEEP_ALIVE + 3 * SLACK
        while time.monotonic() - opened < limit:
            try:
                events = h2_receive(sock, conn)
            except TimeoutError:
                continue
            if events is None:
                closed_after = time.monotonic() - opened
                break
            for event in events:
                if isinstance(event, h2.events.ResponseReceived):
                    statuses.append(dict(event.headers)[b":status"])
    assert statuses == [b"408"]
    assert closed_after is not None, f"the connection was still open after {limit:.1f}s"


def _peak_in_progress(server: ServerProcess, user_agent: str) -> tuple[int, int]:
    """The audit records of ``user_agent``'s requests, counted once they stop coming, and
    the most of those requests in progress at one instant (each record spans its latency,
    up to its time)."""

    def records() -> list[tuple[str, float]]:
        path = Path(server.env["DATA_DIR"]) / "vault.db"
        with contextlib.closing(sqlite3.connect(path)) as db:
            query = "SELECT ts, latency_ms FROM audit WHERE user_agent = ?"
            return db.execute(query, (user_agent,)).fetchall()

    rows, deadline = records(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        rows, before = records(), rows
        if len(rows) == len(before):
            break
    edges = []
    for ts, latency_ms in rows:
        end = dt.datetime.fromisoformat(ts).timestamp()
        edges += [(end - latency_ms / 1000, 1), (end, -1)]
    peak = now = 0
    for _, step in sorted(edges):  # an end sorts before a start at the same instant
        now += step
        peak = max(peak, now)
    return len(rows), peak


def _open_and_reset(conn: Any, count: int, user_agent: str) -> None:
    """``count`` fetches, each opened, sent whole and reset at once (CVE-2023-44487)."""
    import h2.errors

    for _ in range(count):
        stream_id = conn.get_next_available_stream_id()
        body = json.dumps({"secret_id": str(uuid.uuid4())}).encode()
        conn.send_headers(stream_id, h2_headers(FETCH, "POST", ("user-agent", user_agent)))
        conn.send_data(stream_id, body, end_stream=True)
        conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)


def test_an_http2_rapid_reset_runs_no_more_than_the_stream_cap_and_is_closed(
    tls_server: ServerProcess,
) -> None:
    """300 fetches opened and reset at once on one connection: at most the stream cap of
    them run (each a store call and an audit record), and the server answers GOAWAY
    (ENHANCE_YOUR_CALM) and closes the connection; other connections are served."""
    import h2.errors
    import h2.events

    before_log = len(tls_server.output())
    goaway = []
    with h2_connection(tls_server, timeout=10) as (sock, conn):
        while conn.remote_settings.max_concurrent_streams != STREAM_CAP:  # its SETTINGS
            assert h2_receive(sock, conn) is not None
        _open_and_reset(conn, 300, "rapid-reset")
        sock.sendall(conn.data_to_send())
        while (events := h2_receive(sock, conn)) is not None:
            goaway += [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert [e.error_code for e in goaway] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM], goaway
    audited, peak = _peak_in_progress(tls_server, "rapid-reset")
    assert peak <= STREAM_CAP, (audited, peak)
    with httpx.Client(
        base_url=tls_server.url, http1=False, http2=True, verify=tls_server.tls, timeout=5
    ) as client:
        assert client.get("/healthz").status_code == 200
    output = tls_server.output()[before_log:]
    assert "GOAWAY ENHANCE_YOUR_CALM" in output
    assert not error_lines(output)
    assert "Traceback" not in output


def test_streams_reset_mid_answer_never_run_more_than_the_stream_cap(
    tls_server: ServerProcess,
) -> None:
    """A connection that has let 200 requests finish resets 150 more at once: it stays open,
    but only as many run as the stream cap allows; the rest are refused (REFUSED_STREAM,
    nothing processed) and the connection serves what follows."""
    import h2.events

    before_log = len(tls_server.output())
    with h2_connection(tls_server, timeout=10) as (sock, conn):
        for _ in range(4):  # 200 answered, 50 at a time (the cap is on open streams)
            waiting = set()
            for _ in range(50):
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, h2_headers("/healthz", "GET"), end_stream=True)
                waiting.add(stream_id)
            sock.sendall(conn.data_to_send())
            while waiting:
                events = h2_receive(sock, conn)
                assert events is not None, "the server closed the connection"
                waiting -= {e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)}
        _open_and_reset(conn, 150, "reset-mid-answer")
        sock.sendall(conn.data_to_send())
        audited, peak = _peak_in_progress(tls_server, "reset-mid-answer")
        assert 0 < peak <= STREAM_CAP, (audited, peak)
        # Still open, and serving.
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, h2_headers("/healthz", "GET"), end_stream=True)
        sock.sendall(conn.data_to_send())
        statuses: list[bytes] = []
        while not statuses:
            events = h2_receive(sock, conn)
            assert events is not None, "the server closed the connection"
            assert not [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            statuses += [dict(e.headers)[b":status"] for e in events
                         if isinstance(e, h2.events.ResponseReceived)
                         and e.stream_id == stream_id]  # fmt: skip
        assert statuses == [b"200"]
    output = tls_server.output()[before_log:]
    assert not error_lines(output)
    assert "Traceback" not in output


def _h2_get_status(sock: ssl.SSLSocket, conn: Any) -> bytes:
    """GET /healthz on a new stream of this connection: the status it is answered with."""
    import h2.events

    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, h2_headers("/healthz", "GET"), end_stream=True)
    sock.sendall(conn.data_to_send())
    while True:
        events = h2_receive(sock, conn)
        assert events is not None, "the server closed the connection"
        for event in events:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                return bytes(dict(event.headers)[b":status"])


def test_http2_priority_frames_for_streams_without_an_answer_are_ignored(
    tls_server: ServerProcess,
) -> None:
    """PRIORITY frames for streams the client reset while their answers were being made,
    and for streams never opened, leave the connection serving. Hypercorn 0.18 put such
    streams back in its priority tree: a reset stream's late answer then killed the
    connection's sending task (KeyError) and hung the connection and the server's
    shutdown; PRIORITY for 1,000 unopened streams was an unhandled error."""
    before_log = len(tls_server.output())
    with h2_connection(tls_server, timeout=5) as (sock, conn):
        reset = []
        for _ in range(90):  # under the cap: no GOAWAY
            _open_and_reset(conn, 1, "priority-after-reset")
            sock.sendall(conn.data_to_send())  # one by one: read in several batches
            reset.append(conn.highest_outbound_stream_id)
        # While the reset streams' answers are still being made: the timing varies.
        for _ in range(20):
            for stream_id in reset:
                conn.prioritize(stream_id, weight=200)
            sock.sendall(conn.data_to_send())
            time.sleep(0.01)
        assert _h2_get_status(sock, conn) == b"200"
        for stream_id in range(conn.highest_outbound_stream_id + 2, 2**20, 2)[:1200]:
            conn.prioritize(stream_id, weight=10)  # idle streams, never opened
        sock.sendall(conn.data_to_send())
        assert _h2_get_status(sock, conn) == b"200"
    time.sleep(0.2)
    output = tls_server.output()[before_log:]
    assert not error_lines(output)
    assert "Traceback" not in output


# --- response hygiene on every class of /vault answer -----------------------------------------


def _tamper(data_dir: Path, secret_id: str) -> None:
    with sqlite3.connect(data_dir / "vault.db", isolation_level=None) as conn:
        (ciphertext,) = conn.execute(
            "SELECT ciphertext FROM secrets WHERE record_key = ?", (record_key(secret_id),)
        ).fetchone()
        flipped = bytes([ciphertext[0] ^ 1]) + bytes(ciphertext[1:])
        conn.execute(
            "UPDATE secrets SET ciphertext = ? WHERE record_key = ?",
            (flipped, record_key(secret_id)),
        )
    conn.close()


def _break_store(data_dir: Path) -> None:
    with sqlite3.connect(data_dir / "vault.db", isolation_level=None) as conn:
        conn.execute("DROP TABLE secrets")
    conn.close()


def test_every_class_of_vault_answer_has_the_hygiene_headers(
    start_server: StartServer, tmp_path: Path, master_key: str
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(
        {
            "MASTER_KEY": master_key,
            "DATA_DIR": str(data_dir),
            "RATE_LIMIT": "40/minute",
            "MAX_SECRET_BYTES": "1024",
        }
    )
    answers: list[tuple[str, int, httpx.Response]] = []

    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b"A" * 10_000

    with httpx.Client(base_url=server.url, timeout=10) as client:

        def call(label: str, expected: int, method: str, path: str, **kwargs: Any) -> None:
            answers.append((label, expected, client.request(method, path, **kwargs)))

        secret_id = create(client, "aGk=")
        call("create", 200, "POST", CREATE, json={"secret": "aGV5"})
        call("create with a slash", 200, "POST", CREATE + "/", json={"secret": "aGV5"})
        call("fetch", 200, "POST", FETCH, json={"secret_id": secret_id})
        call("not JSON", 400, "POST", CREATE, content=b"{")
        call("bad base64", 400, "POST", CREATE, json={"secret": "a-b_"})
        call("malformed id", 400, "POST", FETCH, json={"secret_id": "nope"})
        call("unknown id", 404, "POST", FETCH, json={"secret_id": str(uuid.uuid4())})
        call("unknown /vault path", 404, "POST", "/vault/secret/nope", json={})
        call("wrong method", 405, "GET", CREATE)
        call("declared body over the cap", 413, "POST", CREATE, content=b"A" * 200_000)
        call("chunked body over the cap", 413, "POST", CREATE, content=chunks())
        call("secret over the limit", 413, "POST", CREATE, json={"secret": b64(bytes(1025))})
        call(
            "wrong content type",
            415,
            "POST",
            CREATE,
            content=b'{"secret": "aGk="}',
            headers={"Content-Type": "text/plain"},
        )
        _tamper(data_dir, secret_id)
        call("tampered record", 500, "POST", FETCH, json={"secret_id": secret_id})
        _break_store(data_dir)
        call("store failing", 503, "POST", FETCH, json={"secret_id": str(uuid.uuid4())})
        for _ in range(40):
            response = client.post(FETCH, json={"secret_id": str(uuid.uuid4())})
            if response.status_code == 429:
                break
        answers.append(("rate limited", 429, response))

    problems = []
    for label, expected, response in answers:
        headers = response.headers
        if headers.get("cache-control") != "no-store":
            problems.append(f"{label}: Cache-Control {headers.get('cache-control')!r}")
        if headers.get("x-content-type-options") != "nosniff":
            problems.append(
                f"{label}: X-Content-Type-Options {headers.get('x-content-type-options')!r}"
            )
        if "server" in headers:
            problems.append(f"{label}: Server {headers['server']!r}")
        if "Traceback" in response.text or 'File "' in response.text:
            problems.append(f"{label}: traceback in the body")
        if response.status_code != expected:
            problems.append(f"{label}: status {response.status_code}, expected {expected}")
        elif expected != 200 and not isinstance(response.json().get("detail"), str):
            problems.append(f"{label}: no JSON detail")
    # A request Hypercorn itself refuses never reaches the app: still no banner.
    status, raw = exchange(server.port, GARBAGE["header line without a colon"][1])
    if status != 400 or re.search(rb"^server:", raw, re.I | re.M):
        problems.append(f"protocol error: {raw[:200]!r}")
    assert "Traceback" not in server.output()
    assert not problems, "\n".join(problems)


def test_refusals_for_missing_api_keys_have_the_hygiene_headers(
    start_server: StartServer, tmp_path: Path, master_key: str
) -> None:
    token = "t" * 40
    server = start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data"), "API_KEYS": f"ci:{token}"}
    )
    with httpx.Client(base_url=server.url, timeout=10) as client:
        refused = [
            client.post(CREATE, json={"secret": "aGk="}),
            client.post(
                CREATE, json={"secret": "aGk="}, headers={"Authorization": "Bearer " + "u" * 40}
            ),
            client.post(
                FETCH, json={"secret_id": str(uuid.uuid4())}, headers={"Authorization": "x"}
            ),
        ]
        allowed = client.post(
            CREATE, json={"secret": "aGk="}, headers={"Authorization": f"Bearer {token}"}
        )
    assert allowed.status_code == 200, allowed.text
    for response in refused:
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "server" not in response.headers
        assert isinstance(response.json()["detail"], str)
        assert token not in response.text


# --- the server's own log after all of the above ----------------------------------------------


def test_the_hostile_run_left_no_traceback_in_the_log(
    server: ServerProcess, tls_server: ServerProcess
) -> None:
    # Last in the module: the module-scoped servers have seen every attack above by now.
    assert "Traceback" not in server.output()
    assert "Traceback" not in tls_server.output()
