"""The SQLite naive app the benchmark compares the service's embedded store with, served for
real (its own process, a SQLite file in tmp_path) and asked through HTTP: it creates and
fetches as the MongoDB naive app does, and commits a secret and an audit record per create."""

from __future__ import annotations

import base64
import sqlite3
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

from loadtests.processes import Process, free_port
from tests.conftest import ROOT, clean_env, wait_until
from vault.crypto import generate_key

pytestmark = pytest.mark.slow  # a server process each

PLAINTEXT = b"naive baseline secret"


@pytest.fixture
def naive_sqlite(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The naive-sqlite app on a free port with DATA_DIR in tmp_path: its URL and its file."""
    port = free_port()
    data = tmp_path / "data"
    server = Process(
        "naive-sqlite",
        [sys.executable, "-m", "loadtests.baselines", "naive-sqlite", "--port", str(port)],
        tmp_path / "naive.log",
        env=clean_env(MASTER_KEY=generate_key(), DATA_DIR=str(data), PYTHONPATH=str(ROOT)),
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        server.check_alive()
        try:
            httpx.get(url + "/", timeout=1)
            return True
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, 20, "the naive-sqlite app to answer")
        yield url, data / "naive.db"
    finally:
        server.stop(10)


def create(url: str, **extra: object) -> str:
    body = {"secret": base64.b64encode(PLAINTEXT).decode(), **extra}
    answer = httpx.post(url + "/vault/secret/create", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    secret_id: str = answer.json()["secret_id"]
    return secret_id


def fetch(url: str, secret_id: str) -> httpx.Response:
    return httpx.post(url + "/vault/secret/fetch", json={"secret_id": secret_id}, timeout=10)


def test_it_creates_and_fetches_as_the_mongodb_naive_app_does(
    naive_sqlite: tuple[str, Path],
) -> None:
    url, database = naive_sqlite
    secret_id = create(url)
    first = fetch(url, secret_id)
    assert first.status_code == 200
    assert base64.b64decode(first.json()["secret"]) == PLAINTEXT
    assert fetch(url, "no-such-id").status_code == 404
    expired = create(url, ttl_seconds=0)  # expired the moment it is stored
    assert fetch(url, expired).status_code == 404
    # No read limits and no delete on read: the secret is still there.
    assert fetch(url, secret_id).status_code == 200

    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        audit = conn.execute("SELECT op, status, secret_id FROM audit ORDER BY id").fetchall()
        stored = conn.execute("SELECT id, ct FROM secrets ORDER BY id").fetchall()
    conn.close()
    # Every request, answered, left its committed audit record, in order.
    assert audit == [
        ("create", 200, secret_id),
        ("fetch", 200, secret_id),
        ("fetch", 404, "no-such-id"),
        ("create", 200, expired),
        ("fetch", 404, expired),
        ("fetch", 200, secret_id),
    ]
    # Sealed with vault.crypto: the file holds ciphertext, never the plaintext.
    assert sorted(row[0] for row in stored) == sorted([secret_id, expired])
    assert all(PLAINTEXT not in bytes(row[1]) for row in stored)
    assert PLAINTEXT not in database.read_bytes()


def test_concurrent_creates_each_commit_their_secret_and_audit_record(
    naive_sqlite: tuple[str, Path],
) -> None:
    # 20 at once: the pool's threads, each with its own connection, contend for the writer
    # lock; every one waits its turn instead of failing.
    url, database = naive_sqlite
    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(lambda _: create(url), range(40)))
    assert len(set(ids)) == 40
    with sqlite3.connect(database) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM secrets")}
        audited = conn.execute("SELECT secret_id FROM audit WHERE op = 'create'").fetchall()
    conn.close()
    assert stored == set(ids)
    assert sorted(row[0] for row in audited) == sorted(ids)
