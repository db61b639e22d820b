"""Embedded default store: one SQLite file under DATA_DIR, in WAL mode, off the event loop.

It is what a newcomer gets with no database. ``synchronous=FULL`` makes every committed
insert survive a power loss, so an acknowledged create is never lost. A small pool of
connections lets reads run beside a write (WAL allows that); SQLite serialises writers.
"""

from __future__ import annotations

import os
import queue
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import anyio

from vault.stores.base import SealedSecret, StoreUnavailable, run_off_loop

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    secret_id  TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;
"""


class SQLiteStore:
    """Secrets in the ``secrets`` table of one SQLite file."""

    def __init__(self, path: Path, *, timeout: float = 4.0, connections: int = 4) -> None:
        self._path = path
        self._timeout = timeout
        self._size = connections
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._limiter: anyio.CapacityLimiter | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _open_sync(self) -> None:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        first = self._connect()
        first.executescript(_SCHEMA)
        self._pool.put(first)
        for _ in range(self._size - 1):
            self._pool.put(self._connect())

    async def open(self) -> None:
        self._limiter = anyio.CapacityLimiter(self._size)
        await anyio.to_thread.run_sync(self._open_sync)

    async def close(self) -> None:
        while not self._pool.empty():
            self._pool.get_nowait().close()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        conn = self._pool.get()
        try:
            yield conn
        finally:
            self._pool.put(conn)

    async def _run(self, func: Callable[[sqlite3.Connection], T]) -> T:
        if self._limiter is None:
            raise RuntimeError("store used before open()")

        def call() -> T:
            with self._connection() as conn:
                return func(conn)

        try:
            return await run_off_loop(call, limiter=self._limiter, timeout=self._timeout + 1.0)
        except sqlite3.OperationalError as exc:
            # Locked, read-only, out of disk or unreadable: transient from the caller's view.
            raise StoreUnavailable(f"sqlite: {exc.sqlite_errorname}") from None

    async def insert(self, record: SealedSecret) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO secrets (secret_id, key_id, nonce, ciphertext) VALUES (?, ?, ?, ?)",
                (record.secret_id, record.key_id, record.nonce, record.ciphertext),
            )

        await self._run(insert)

    async def get(self, secret_id: str) -> SealedSecret | None:
        def get(conn: sqlite3.Connection) -> tuple[str, bytes, bytes] | None:
            row: tuple[str, bytes, bytes] | None = conn.execute(
                "SELECT key_id, nonce, ciphertext FROM secrets WHERE secret_id = ?",
                (secret_id,),
            ).fetchone()
            return row

        row = await self._run(get)
        if row is None:
            return None
        key_id, nonce, ciphertext = row
        return SealedSecret(secret_id=secret_id, key_id=key_id, nonce=nonce, ciphertext=ciphertext)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())
