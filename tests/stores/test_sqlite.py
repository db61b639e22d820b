"""vault/stores/sqlite/: the embedded default store on a real file."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.conftest import b64, clean_env
from vault.app import create_app
from vault.crypto import Keyring, generate_key, parse_key
from vault.records import record_key
from vault.settings import Settings
from vault.stores.base import utc_now
from vault.stores.sqlite import SQLiteBulk


def _client(data_dir: Path, **env: str) -> TestClient:
    settings = Settings.from_env({"MASTER_KEY": generate_key(), "DATA_DIR": str(data_dir), **env})
    return TestClient(create_app(settings))


def test_store_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    with _client(data_dir) as client:
        assert client.post("/vault/secret/create", json={"secret": b64(b"x")}).status_code == 200
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "vault.db").stat().st_mode) == 0o600
    with sqlite3.connect(data_dir / "vault.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_locked_database_answers_503_in_bounded_time_then_recovers(tmp_path: Path) -> None:
    with _client(tmp_path, STORE_TIMEOUT_SECONDS="1") as client:
        blocker = sqlite3.connect(tmp_path / "vault.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            response = client.post("/vault/secret/create", json={"secret": b64(b"x")})
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"  # RETRY_AFTER_SECONDS
            assert time.monotonic() - started < 5
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert client.post("/vault/secret/create", json={"secret": b64(b"x")}).status_code == 200


def test_stores_opened_one_after_another_in_a_process_all_see_the_same_file(
    tmp_path: Path,
) -> None:
    # Stores on one file in one process (test clients; an app and a command's check) while
    # another process writes it and goes: each must see every write, the others' included.
    key = generate_key()
    with _client(tmp_path, MASTER_KEY=key) as first:
        body = {"secret": b64(b"x"), "max_reads": 3}
        fetch = {"secret_id": first.post("/vault/secret/create", json=body).json()["secret_id"]}
        with _client(tmp_path, MASTER_KEY=key) as second:
            subprocess.run(
                [sys.executable, "-m", "vault", "rewrap"],
                env=clean_env(MASTER_KEY=key, DATA_DIR=str(tmp_path)),
                capture_output=True,
                check=True,
                timeout=60,
            )
            with _client(tmp_path, MASTER_KEY=key) as third:
                assert third.post("/vault/secret/fetch", json=fetch).json()["reads_left"] == 2
            assert second.post("/vault/secret/fetch", json=fetch).json()["reads_left"] == 1
            assert first.post("/vault/secret/fetch", json=fetch).json()["reads_left"] == 0


def test_a_file_from_an_earlier_version_is_upgraded_and_keeps_its_records(
    tmp_path: Path,
) -> None:
    # The audit table as the first release wrote it: no api_key_name, no record_id.
    tmp_path.mkdir(exist_ok=True, mode=0o700)
    with closing(sqlite3.connect(tmp_path / "vault.db")) as conn, conn:
        conn.execute(
            "CREATE TABLE audit (id INTEGER PRIMARY KEY, ts TEXT NOT NULL, op TEXT NOT NULL,"
            " status INTEGER NOT NULL, outcome TEXT NOT NULL, client_ip TEXT NOT NULL,"
            " request_id TEXT NOT NULL, secret_id_hmac TEXT, latency_ms REAL NOT NULL,"
            " user_agent TEXT)"
        )
        conn.execute(
            "INSERT INTO audit (ts, op, status, outcome, client_ip, request_id, latency_ms)"
            " VALUES ('2026-01-01T00:00:00.000000Z', 'fetch', 404, 'not_found', 'x', 'old', 1)"
        )
    with _client(tmp_path) as client:
        assert client.post("/vault/secret/fetch", json={"secret_id": "nope"}).status_code == 400
        assert client.post("/vault/secret/create", json={"secret": b64(b"x")}).status_code == 200
    with closing(sqlite3.connect(tmp_path / "vault.db")) as conn:
        rows = conn.execute(
            "SELECT request_id, status, record_id FROM audit ORDER BY id"
        ).fetchall()
    assert [(row[0] == "old", row[1]) for row in rows] == [(True, 404), (False, 400), (False, 200)]
    assert rows[0][2] is None
    assert rows[1][2] and rows[2][2] and rows[1][2] != rows[2][2]


def test_secrets_an_earlier_version_stored_under_their_ids_are_served_and_deleted(
    tmp_path: Path,
) -> None:
    # The secrets table as the first release wrote it: keyed by the id, sealed with the id
    # in the associated data, no lifecycle columns yet.
    key = generate_key()
    keyring = Keyring(parse_key(key))
    kept, deleted = str(uuid.uuid4()), str(uuid.uuid4())
    tmp_path.mkdir(exist_ok=True, mode=0o700)
    with closing(sqlite3.connect(tmp_path / "vault.db")) as conn, conn:
        conn.execute(
            "CREATE TABLE secrets (secret_id TEXT PRIMARY KEY, key_id TEXT NOT NULL,"
            " nonce BLOB NOT NULL, ciphertext BLOB NOT NULL, created_at TEXT NOT NULL"
            " DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))) WITHOUT ROWID"
        )
        for secret_id in (kept, deleted):
            sealed = keyring.seal(secret_id, secret_id.encode())
            conn.execute(
                "INSERT INTO secrets (secret_id, key_id, nonce, ciphertext) VALUES (?, ?, ?, ?)",
                (secret_id, sealed.key_id, sealed.nonce, sealed.ciphertext),
            )
    with _client(tmp_path, MASTER_KEY=key) as client:
        for secret_id in (kept, deleted):
            got = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
            assert got.status_code == 200 and got.json()["secret"] == b64(secret_id.encode())
        gone = client.post("/vault/secret/delete", json={"secret_id": deleted})
        assert gone.json() == {"secret_id": deleted, "deleted": True}
        again = client.post("/vault/secret/fetch", json={"secret_id": deleted})
        assert again.status_code == 404
        new = client.post("/vault/secret/create", json={"secret": b64(b"new")}).json()
    with closing(sqlite3.connect(tmp_path / "vault.db")) as conn:
        keys = {row[0] for row in conn.execute("SELECT record_key FROM secrets")}
    # The old row keeps its id until rewrap converts it; the new one is under its digest.
    assert keys == {kept, record_key(new["secret_id"])}


def test_an_export_reads_one_instant_of_a_store_written_meanwhile(tmp_path: Path) -> None:
    """SQLiteBulk.snapshot: records created during an export are not half in the file."""
    data_dir = tmp_path / "data"
    with _client(data_dir, RATE_LIMIT="off") as client:
        for n in range(1200):  # more than one fetchmany page
            client.post("/vault/secret/create", json={"secret": b64(b"%d" % n)})
        bulk = SQLiteBulk(data_dir / "vault.db", create=False, timeout=4.0)
        with closing(bulk) as store, store.snapshot():
            held = store.count_secrets()
            records = store.secrets(utc_now())
            first = next(records)
            for _ in range(50):  # acknowledged while the export runs
                assert (
                    client.post("/vault/secret/create", json={"secret": b64(b"x")}).status_code
                    == 200
                )
            exported = [first, *records]
            audited = sum(1 for _ in store.audit())
        assert held == len(exported) == 1200
        assert audited == 1200
        assert len({record.sealed.record_key for record in exported}) == 1200
    with (
        closing(SQLiteBulk(data_dir / "vault.db", create=False, timeout=4.0)) as store,
        store.snapshot(),
    ):
        assert store.count_secrets() == 1250


def test_export_refuses_a_missing_file_rather_than_create_an_empty_store(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SQLiteBulk(tmp_path / "vault.db", create=False, timeout=4.0)
    assert not (tmp_path / "vault.db").exists()
