"""The real server (``secret-manager serve`` on Hypercorn) over real sockets."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from middleware.errors import GENERIC_DETAIL
from tests.conftest import (
    b64,
    children,
    clean_env,
    free_port,
    running,
    wait_until,
    worker_processes,
)
from vault.crypto import generate_key, key_id, parse_key
from vault.settings import Settings

pytestmark = pytest.mark.slow

StartServer = Callable[..., Any]


def create(url: str, secret: str) -> str:
    response = httpx.post(url + "/vault/secret/create", json={"secret": secret}, timeout=10)
    assert response.status_code == 200, response.text
    secret_id = response.json()["secret_id"]
    assert isinstance(secret_id, str)
    return secret_id


def fetch(url: str, secret_id: str) -> httpx.Response:
    return httpx.post(url + "/vault/secret/fetch", json={"secret_id": secret_id}, timeout=10)


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=1)
    except httpx.HTTPError:
        return False
    return True


# --- --dev mode and durability -----------------------------------------------------------


def test_dev_mode_persists_its_key_and_the_secrets(
    start_server: StartServer, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = {"DATA_DIR": str(data_dir)}
    key_path = data_dir / "master.key"

    first = start_server(env, "--dev")
    assert key_path.exists()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = key_path.read_text().strip()
    assert len(base64.b64decode(key, validate=True)) == 32

    secret = b64(b"dev-mode secret " + os.urandom(8))
    secret_id = create(first.url, secret)
    assert first.stop() == 0
    first_output = first.output()
    assert "DEVELOPMENT MODE" in first_output
    assert key not in first_output

    second = start_server(env, "--dev")
    response = fetch(second.url, secret_id)
    assert response.status_code == 200, response.text
    assert response.json() == {"secret": secret}
    assert key_path.read_text().strip() == key  # the same key, not a new one
    assert second.stop() == 0
    assert "DEVELOPMENT MODE" in second.output()
    assert key not in second.output()


def test_dev_mode_hands_its_key_to_every_worker_as_a_value(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The workers get the settings serve validated inside their app factory: none of them
    # starts with a MASTER_KEY_FILE that serve wrote into the environment.
    server = start_server({"DATA_DIR": str(tmp_path / "data")}, "--dev", "--workers", "2")
    secret = b64(os.urandom(32))
    secret_ids = [create(server.url, secret) for _ in range(10)]  # new connections each
    for secret_id in secret_ids:
        assert fetch(server.url, secret_id).json() == {"secret": secret}
    workers = worker_processes(server.process.pid)
    assert len(workers) == 2  # both built their app: a keyless one would have exited
    for worker in workers:
        environment = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        assert not any(entry.startswith(b"MASTER_KEY") for entry in environment)
    assert server.stop(timeout=20) == 0


def test_without_dev_no_key_file_is_written(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "vault", "serve", "--port", str(free_port())],
        env=clean_env(DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode != 0
    assert "MASTER_KEY" in result.stderr
    assert not (data_dir / "master.key").exists()


# --- several processes, one MongoDB --------------------------------------------------------


def test_two_servers_share_one_mongodb(
    start_server: StartServer, mongo_uri: str, master_key: str, tmp_path: Path
) -> None:
    env = {
        "MASTER_KEY": master_key,
        "MONGO_URI": mongo_uri,
        "MONGO_DB": "t" + uuid.uuid4().hex[:16],
        "DATA_DIR": str(tmp_path / "data"),
    }
    a = start_server(env)
    b = start_server(env)
    plaintext = os.urandom(300)
    secret_id = create(a.url, b64(plaintext))
    response = fetch(b.url, secret_id)
    assert response.status_code == 200, response.text
    assert base64.b64decode(response.json()["secret"]) == plaintext
    # And the other way round.
    other = os.urandom(5)
    response = fetch(a.url, create(b.url, b64(other)))
    assert base64.b64decode(response.json()["secret"]) == other


# --- key rotation ---------------------------------------------------------------------------


def test_key_rotation(start_server: StartServer, tmp_path: Path) -> None:
    k1, k2 = generate_key(), generate_key()
    data_dir = str(tmp_path / "data")
    old_secret = b64(b"sealed under K1")

    first = start_server({"MASTER_KEY": k1, "DATA_DIR": data_dir})
    old_id = create(first.url, old_secret)
    assert first.stop() == 0

    rotated = start_server({"MASTER_KEY": k2, "MASTER_KEY_PREVIOUS": k1, "DATA_DIR": data_dir})
    assert fetch(rotated.url, old_id).json() == {"secret": old_secret}
    new_secret = b64(b"sealed under K2")
    new_id = create(rotated.url, new_secret)
    assert fetch(rotated.url, new_id).json() == {"secret": new_secret}
    assert rotated.stop() == 0

    # K1 dropped while a record still needs it: serve refuses (tests/test_keyguard.py) unless
    # K1 is retired on purpose; then the old secret cannot be opened, and says so generically.
    only_k2 = start_server(
        {"MASTER_KEY": k2, "DATA_DIR": data_dir, "RETIRED_KEY_IDS": key_id(parse_key(k1))}
    )
    response = fetch(only_k2.url, old_id)
    assert response.status_code == 500
    body = response.json()
    assert body == {"detail": GENERIC_DETAIL}
    for material in (k1, k2, old_secret):
        assert material not in response.text
    assert fetch(only_k2.url, new_id).json() == {"secret": new_secret}
    newest = b64(b"still works")
    assert fetch(only_k2.url, create(only_k2.url, newest)).json() == {"secret": newest}
    assert only_k2.stop() == 0
    for material in (k1, k2, old_secret, new_secret):
        assert material not in only_k2.output()


# --- process management ------------------------------------------------------------------


def test_two_workers_serve_and_stop_on_sigterm(
    start_server: StartServer, tmp_path: Path, master_key: str
) -> None:
    server = start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}, "--workers", "2"
    )
    secret = b64(os.urandom(32))
    with httpx.Client(timeout=10) as one:
        secret_id = one.post(server.url + "/vault/secret/create", json={"secret": secret}).json()[
            "secret_id"
        ]
    with httpx.Client(timeout=10) as two:
        response = two.post(server.url + "/vault/secret/fetch", json={"secret_id": secret_id})
    assert response.json() == {"secret": secret}
    started = time.monotonic()
    assert server.stop(timeout=20) == 0
    assert time.monotonic() - started < 20
    assert not _answers(server.url)


def test_a_worker_that_dies_stops_the_server_with_a_failure_code(
    start_server: StartServer, tmp_path: Path, master_key: str
) -> None:
    # A supervisor that restarts on failure (systemd Restart=on-failure) must see one.
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    server = start_server({**env, "GRACEFUL_TIMEOUT_SECONDS": "3"}, "--workers", "2")
    workers = worker_processes(server.process.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    try:
        code = server.process.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("the server kept running with a worker gone")
    assert code == 1
    assert "exited with code -9: stopping the others" in server.output()
    assert not _answers(server.url)


def _bindable(port: int) -> bool:
    """Whether a new listener can take the port, as ``serve`` binds it (no SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def test_sigkill_of_the_supervisor_stops_its_workers_and_frees_the_port(
    start_server: StartServer, tmp_path: Path, master_key: str
) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    server = start_server({**env, "GRACEFUL_TIMEOUT_SECONDS": "3"}, "--workers", "2")
    assert len(worker_processes(server.process.pid)) == 2
    processes = children(server.process.pid)
    assert not _bindable(server.port)  # the check below can tell a held port
    server.process.kill()
    killed = time.monotonic()
    server.process.wait(5)
    # Measured: every child gone 0.1 to 0.2 s after the SIGKILL; generous for a loaded CI.
    while any(running(child) for child in processes) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    left = [child for child in processes if running(child)]
    assert not left, f"processes {left} still running 10s after their supervisor's SIGKILL"
    assert _bindable(server.port)
    assert not _answers(server.url)
    assert "the supervisor is gone, shutting down" in server.output()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_server_on_a_held_port_fails_and_the_first_keeps_serving(
    start_server: StartServer, tmp_path: Path, master_key: str, workers: int
) -> None:
    # Two workers: the port was bound with SO_REUSEPORT, so a second server with two
    # workers bound it too and the kernel split connections between the two.
    first = start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "first")}, "--workers", "2"
    )
    secret = b64(os.urandom(16))
    secret_id = create(first.url, secret)
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "vault",
            "serve",
            "--port",
            str(first.port),
            "--workers",
            str(workers),
        ],
        env=clean_env(MASTER_KEY=generate_key(), DATA_DIR=str(tmp_path / "second")),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 2
    assert second.stdout == ""
    assert second.stderr == (
        f"secret-manager: cannot listen on 127.0.0.1:{first.port}: Address already in use\n"
    )
    # Every fresh connection still reaches the first server (its key, its data).
    for _ in range(10):
        assert fetch(first.url, create(first.url, secret)).json() == {"secret": secret}
    assert fetch(first.url, secret_id).json() == {"secret": secret}
    assert first.stop() == 0


def test_sigterm_exits_zero_within_the_graceful_timeout(
    start_server: StartServer, tmp_path: Path, master_key: str
) -> None:
    server = start_server(
        {
            "MASTER_KEY": master_key,
            "DATA_DIR": str(tmp_path / "data"),
            "GRACEFUL_TIMEOUT_SECONDS": "3",
        }
    )
    # An idle keep-alive connection is open while the server is told to stop.
    with httpx.Client(timeout=5) as client:
        assert client.get(server.url + "/healthz").status_code == 200
        started = time.monotonic()
        assert server.stop(timeout=10) == 0
        elapsed = time.monotonic() - started
    assert elapsed < 3 + 2, f"took {elapsed:.1f}s to stop"
    assert not _answers(server.url)


@pytest.mark.parametrize(
    ("workers", "sig"),
    [("1", signal.SIGTERM), ("1", signal.SIGINT), ("2", signal.SIGTERM), ("2", signal.SIGINT)],
)
def test_a_graceful_shutdown_logs_its_start_and_its_end(
    start_server: StartServer, tmp_path: Path, master_key: str, workers: str, sig: int
) -> None:
    # After "Running on ..." an operator who sent a signal sees the drain begin and end,
    # rather than silence until the process is gone.
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    server = start_server({**env, "GRACEFUL_TIMEOUT_SECONDS": "3"}, "--workers", workers)
    wait_until(
        lambda: server.output().count("Running on http://") == int(workers),
        20,
        "every worker to log that it is running",
    )
    server.process.send_signal(sig)
    assert server.process.wait(20) == 0
    messages = [
        json.loads(line)["message"] for line in server.output().splitlines() if line[:1] == "{"
    ]
    name = signal.Signals(sig).name
    running = [i for i, m in enumerate(messages) if m.startswith("Running on http://")]
    draining = [i for i, m in enumerate(messages) if m.startswith(f"{name} received: ")]
    assert len(running) == int(workers) and len(draining) == 1, messages
    assert "requests in flight have up to 3s to finish" in messages[draining[0]]
    assert max(running) < draining[0] < len(messages) - 1, messages
    assert re.fullmatch(rf"stopped \d+\.\ds after {name}, exit status 0", messages[-1]), messages


# --- the body cap over a raw socket --------------------------------------------------------


def _read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length body; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    data = b""

    def more() -> bytes:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no complete response within {timeout}s: {data!r}"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        return chunk

    while b"\r\n\r\n" not in data:
        chunk = more()
        assert chunk, f"connection closed before the response headers: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = more()
        assert chunk, f"connection closed inside the response body: {body!r}"
        body += chunk
    return status, headers, body[:length]


def test_declared_oversized_body_is_refused_before_it_is_sent(
    start_server: StartServer, tmp_path: Path, master_key: str
) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    settings = Settings.from_env(env)
    server = start_server(env)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /vault/secret/create HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n"
            b"\r\n"
        )
        started = time.monotonic()
        status, headers, body = _read_response(sock, timeout=2)
        assert time.monotonic() - started < 2
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == {
        "detail": f"request body is larger than {settings.max_body_bytes} bytes; "
        f"secrets may be at most {settings.max_secret_bytes} bytes once decoded"
    }


def test_chunked_oversized_body_is_refused_while_it_streams(
    start_server: StartServer, tmp_path: Path, master_key: str
) -> None:
    server = start_server({"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")})
    chunk_size = 64 * 1024
    chunk = b"%x\r\n" % chunk_size + b"A" * chunk_size + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /vault/secret/create HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"\r\n"
        )
        while sent < 20_000_000:
            readable, _, _ = select.select([sock], [], [], 0.01)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += chunk_size
        sent_when_answered = sent
        status, _, body = _read_response(sock, timeout=5)
    assert status == 413
    assert "detail" in json.loads(body)
    assert sent_when_answered < 2_000_000, f"{sent_when_answered} bytes sent before the 413"


# --- Hypercorn wiring and headers ------------------------------------------------------------


def test_response_headers(start_server: StartServer, tmp_path: Path, master_key: str) -> None:
    server = start_server({"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")})
    with httpx.Client(base_url=server.url, timeout=10) as client:
        health = client.get("/healthz")
        created = client.post("/vault/secret/create", json={"secret": "aGk="})
        fetched = client.post(
            "/vault/secret/fetch",
            json={"secret_id": created.json()["secret_id"]},
            headers={"X-Request-ID": "trace-42.abc:XYZ_1"},
        )
        missing = client.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
    assert fetched.json() == {"secret": "aGk="}
    assert missing.status_code == 404
    for response in (health, created, fetched, missing):
        assert "server" not in response.headers
    for response in (created, fetched, missing):
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-request-id"]
    assert fetched.headers["x-request-id"] == "trace-42.abc:XYZ_1"
    assert created.headers["x-request-id"] != missing.headers["x-request-id"]


# --- nothing secret in the logs -----------------------------------------------------------------


def test_logs_carry_no_secret_material(
    start_server: StartServer, store_env: dict[str, str], master_key: str
) -> None:
    # DEBUG, on both stores: pymongo's own DEBUG command log quotes every document sent.
    server = start_server({**store_env, "LOG_LEVEL": "DEBUG"})
    plaintext = b"canary-plaintext-" + uuid.uuid4().hex.encode()
    secret = b64(plaintext)
    secret_id = create(server.url, secret)
    assert fetch(server.url, secret_id).json() == {"secret": secret}
    # A failing request is logged too; it must not quote what it was sent either.
    assert fetch(server.url, secret_id.upper() + "x").status_code == 400
    assert server.stop() == 0
    output = server.output()
    assert "Running on" in output  # the log was captured at all
    for material in (secret, plaintext.decode(), secret_id, secret_id.upper(), master_key):
        assert material not in output
