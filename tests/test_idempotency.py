"""Idempotent creates: an Idempotency-Key makes a retried create safe, on both stores,
across workers and replicas, through a connection lost after the server answered."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pymongo
import pytest
from starlette.testclient import TestClient

from tests.conftest import ServerProcess, b64, wait_until
from vault.client import Client

BODY = {"secret": b64(b"once only"), "max_reads": 3, "receipt": True}


def stored_secrets(env: dict[str, str]) -> int:
    if "MONGO_URI" in env:
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            return int(client[env["MONGO_DB"]]["secrets"].count_documents({}))
    with sqlite3.connect(Path(env["DATA_DIR"]) / "vault.db") as conn:
        return int(conn.execute("SELECT count(*) FROM secrets").fetchone()[0])


def read_message(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 request or answer with a Content-Length, as it arrives."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def create(client: TestClient | httpx.Client, key: str | None, body: Any = None) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post("/vault/secret/create", json=body or BODY, headers=headers)


def test_a_repeat_gets_the_first_answer_byte_for_byte_and_stores_nothing(
    client: TestClient, store_env: dict[str, str]
) -> None:
    key = str(uuid.uuid4())
    first = create(client, key)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    for _ in range(3):
        again = create(client, key)
        assert again.status_code == 200
        assert again.content == first.content  # same secret_id, same receipt_id
        assert again.headers["idempotent-replayed"] == "true"
    assert stored_secrets(store_env) == 1
    secret_id = first.json()["secret_id"]
    fetched = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
    assert fetched.json()["reads_left"] == 2  # the repeats spent nothing either
    # Without the header every create is a new secret, as before.
    assert create(client, None).json()["secret_id"] != create(client, None).json()["secret_id"]


def test_the_same_key_with_another_body_is_refused(
    client: TestClient, store_env: dict[str, str]
) -> None:
    key = "deploy-2026-12-04-run-17"
    assert create(client, key).status_code == 200
    other = create(client, key, {"secret": b64(b"something else")})
    assert other.status_code == 422
    assert "different request body" in other.json()["detail"]
    assert stored_secrets(store_env) == 1


@pytest.mark.parametrize(
    "value", ["", "x" * 256, "caf\u00e9", "tab\there", "line\u007fdel"], ids=repr
)
def test_a_malformed_key_is_refused_and_nothing_is_stored(
    client: TestClient, store_env: dict[str, str], value: str
) -> None:
    answer = client.post(
        "/vault/secret/create",
        content=json.dumps(BODY).encode(),
        headers=[("content-type", "application/json"), ("idempotency-key", value.encode("utf-8"))],
    )
    assert answer.status_code == 400 and "Idempotency-Key" in answer.json()["detail"]
    twice = client.post(
        "/vault/secret/create",
        content=json.dumps(BODY).encode(),
        headers=[
            ("content-type", "application/json"),
            ("idempotency-key", b"a"),
            ("idempotency-key", b"b"),
        ],
    )
    assert twice.status_code == 400
    assert stored_secrets(store_env) == 0
    assert create(client, "x" * 255).status_code == 200  # the longest allowed


def test_keys_are_scoped_per_api_key(
    make_client: Callable[..., TestClient], tmp_path: Path, store_env: dict[str, str]
) -> None:
    tokens = {"acme/ci": "ci-" + "c" * 40, "acme/web": "web-" + "w" * 40, "beta/ci": "b" * 40}
    keys = tmp_path / "keys"
    keys.write_text("".join(f"{name}:{token}\n" for name, token in tokens.items()))
    client = make_client(API_KEYS_FILE=str(keys), RATE_LIMIT="off")
    ids = set()
    for token in tokens.values():
        answer = client.post(
            "/vault/secret/create",
            json=BODY,
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "same"},
        )
        assert answer.status_code == 200 and "idempotent-replayed" not in answer.headers
        ids.add(answer.json()["secret_id"])
    assert len(ids) == 3 and stored_secrets(store_env) == 3


def test_the_window_ends_and_the_key_makes_a_new_secret(
    make_client: Callable[..., TestClient], store_env: dict[str, str]
) -> None:
    client = make_client(IDEMPOTENCY_TTL_SECONDS="1")
    first = create(client, "k").json()["secret_id"]
    assert create(client, "k").json()["secret_id"] == first
    wait_until(lambda: create(client, "k").json()["secret_id"] != first, 5, "the window to end")
    assert stored_secrets(store_env) == 2


# --- real processes ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_repeat_while_the_first_is_in_flight_gets_409(
    start_server: Callable[..., ServerProcess], store_env: dict[str, str]
) -> None:
    server = start_server(store_env)
    body = json.dumps(BODY).encode()
    head = (
        "POST /vault/secret/create HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nIdempotency-Key: slow-one\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(head + body[:10])  # the first create: its body still arriving
        time.sleep(0.3)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            busy = create(client, "slow-one")
            assert busy.status_code == 409 and busy.headers["retry-after"] == "1"
            slow.sendall(body[10:])
            answer = read_message(slow).decode()
            assert answer.startswith("HTTP/1.1 200"), answer
            first = json.loads(answer.split("\r\n\r\n", 1)[1])
            again = create(client, "slow-one")
    assert again.status_code == 200 and again.json() == first
    assert stored_secrets(store_env) == 1


def _race(servers: list[ServerProcess], key: str, n: int) -> list[httpx.Response]:
    def send(k: int) -> httpx.Response:
        with httpx.Client(base_url=servers[k % len(servers)].url, timeout=20) as client:
            return create(client, key)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(send, range(n)))


def _one_secret(servers: list[ServerProcess], env: dict[str, str]) -> None:
    """The same create raced from every process: one secret; every 200 names it."""
    for round_ in range(3):
        answers = _race(servers, f"race-{round_}", 12)
        ok = [a for a in answers if a.status_code == 200]
        # On failure: every answer, and what the servers logged (the 5xx's request id).
        assert ok and all(a.status_code in (200, 409) for a in answers), (
            [(a.status_code, a.text) for a in answers],
            [server.log.read_text()[-4000:] for server in {id(s): s for s in servers}.values()],
        )
        assert len({a.json()["secret_id"] for a in ok}) == 1
    assert stored_secrets(env) == 3


@pytest.mark.slow
def test_one_secret_across_two_workers(
    start_server: Callable[..., ServerProcess], store_env: dict[str, str]
) -> None:
    server = start_server({**store_env, "RATE_LIMIT": "off"}, "--workers", "2")
    _one_secret([server, server], store_env)


@pytest.mark.slow
def test_one_secret_across_two_replicas(start_replicas: Callable[..., Any]) -> None:
    servers, env = start_replicas()
    _one_secret(servers, env)


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 that forwards each request to the server and reads its whole
    answer; the first answer it then drops (it closes the client's connection without
    sending it: the server acted, and the client cannot know), later ones it passes on."""

    def __init__(self, upstream: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream = upstream
        self.requests: list[bytes] = []
        self.answers: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            with conn, socket.create_connection(("127.0.0.1", self.upstream)) as up:
                request = read_message(conn)
                self.requests.append(request)
                up.sendall(request)
                answer = read_message(up)
                self.answers.append(answer)
                if len(self.answers) > 1:
                    conn.sendall(answer)
            # the first connection closed here with nothing sent back

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def dropping(
    start_server: Callable[..., ServerProcess], store_env: dict[str, str]
) -> Iterator[Any]:
    server = start_server(store_env)
    proxy = DroppingProxy(server.port)
    yield server, proxy
    proxy.close()


@pytest.mark.slow
def test_a_create_whose_answer_was_lost_is_retried_into_the_same_secret(
    dropping: Any, store_env: dict[str, str]
) -> None:
    server, proxy = dropping
    key = str(uuid.uuid4())
    with pytest.raises(httpx.TransportError):
        httpx.post(
            f"http://127.0.0.1:{proxy.port}/vault/secret/create",
            json=BODY,
            headers={"Idempotency-Key": key},
            timeout=10,
        )
    assert proxy.answers and proxy.answers[0].startswith(b"HTTP/1.1 200")  # it was stored
    with httpx.Client(base_url=server.url, timeout=10) as client:
        retried = create(client, key)  # the retry, with the same key
    assert retried.status_code == 200 and retried.headers["idempotent-replayed"] == "true"
    lost = json.loads(proxy.answers[0].split(b"\r\n\r\n", 1)[1])
    assert retried.json() == lost
    assert stored_secrets(store_env) == 1


@pytest.mark.slow
def test_the_client_retries_a_create_whose_answer_was_lost_into_one_secret(
    dropping: Any, store_env: dict[str, str]
) -> None:
    """vault.client sends one Idempotency-Key per create and retries a create cut off after
    it was sent: the server stored the secret once, and the retry gets its id."""
    _, proxy = dropping
    with Client(f"http://127.0.0.1:{proxy.port}", max_attempts=3, backoff_seconds=0.1) as client:
        created = client.create(b"cut off once", max_reads=2)
    assert len(proxy.requests) == 2  # the first answer was lost, the retry got one
    keys = {
        line
        for request in proxy.requests
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"idempotency-key:")
    }
    assert len(keys) == 1  # the same key on both attempts
    assert json.loads(proxy.answers[0].split(b"\r\n\r\n", 1)[1])["secret_id"] == created.secret_id
    assert stored_secrets(store_env) == 1
