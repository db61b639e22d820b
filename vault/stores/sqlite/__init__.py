"""Embedded default store: one SQLite file under DATA_DIR, in WAL mode, off the event loop.

It is what a newcomer gets with no database. ``synchronous=FULL`` makes every committed
insert survive a power loss, so an acknowledged create is never lost. A small pool of
connections lets reads run beside a write (WAL allows that); SQLite serialises writers.

The package holds, as the MongoDB store's does under the same names: ``store.py`` (the
serving store), ``bulk.py`` (export, import and their whole-store reads and writes),
``documents.py`` (a record and an audit record as rows, and the statements that write
them), ``connection.py`` (the file, its schema and its connections) and ``errors.py``
(sqlite3's errors mapped onto vault.errors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vault.errors import ConfigError
from vault.stores.base import BulkStore, SecretStore
from vault.stores.sqlite.bulk import SQLiteBulk
from vault.stores.sqlite.documents import COUNT_LIVE_BY_KEY_ID, NEXT_KEY_ID, sqlite_timestamp
from vault.stores.sqlite.store import SQLiteStore

__all__ = [
    "COUNT_LIVE_BY_KEY_ID",
    "NEXT_KEY_ID",
    "SQLiteBackend",
    "SQLiteBulk",
    "SQLiteStore",
    "sqlite_timestamp",
]

DATABASE_FILE = "vault.db"  # in DATA_DIR, beside a --dev server's master.key


@dataclass(frozen=True)
class SQLiteBackend:
    """The embedded store: DATA_DIR/vault.db (``Backend`` of vault/stores/base.py)."""

    data_dir: Path
    timeout: float
    max_secret_bytes: int
    kind: str = "sqlite"
    # The lifecycle events its serving store writes (Settings.emitted_events).
    events: frozenset[str] = frozenset()

    @property
    def path(self) -> Path:
        return self.data_dir / DATABASE_FILE

    @property
    def label(self) -> str:
        return f"SQLite file {str(self.path)!r}"

    def check(self) -> None:
        """Nothing to check before the file is used."""

    def check_writable(self, *, create: bool) -> None:
        data_dir = self.data_dir
        if create:
            try:
                data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"DATA_DIR={str(data_dir)!r} cannot be created: {exc.strerror}"
                ) from None
            if not os.access(data_dir, os.W_OK | os.X_OK):
                raise ConfigError(f"DATA_DIR={str(data_dir)!r} is not writable by this user")
            return
        # Nothing made yet: an import checks its file whole before it writes a directory.
        absolute = data_dir.absolute()
        existing = next(path for path in (absolute, *absolute.parents) if path.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = "is not writable" if existing == absolute else f"cannot be created in {existing}"
            raise ConfigError(f"DATA_DIR={str(data_dir)!r} {what} by this user")

    def exists(self) -> bool:
        return self.path.is_file()

    def open(self) -> SecretStore:
        return SQLiteStore(
            self.path,
            timeout=self.timeout,
            max_secret_bytes=self.max_secret_bytes,
            events=self.events,
        )

    def open_bulk(self, *, create: bool) -> BulkStore:
        return SQLiteBulk(self.path, create=create, timeout=self.timeout)
