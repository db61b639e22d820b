"""vault/stores/sqlite.py: the embedded default store on a real file."""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path

from starlette.testclient import TestClient

from tests.conftest import b64
from vault.app import create_app
from vault.crypto import generate_key
from vault.settings import Settings


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
            assert response.headers["retry-after"]
            assert time.monotonic() - started < 5
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert client.post("/vault/secret/create", json={"secret": b64(b"x")}).status_code == 200
