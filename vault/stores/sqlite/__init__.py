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

from vault.stores.sqlite.bulk import SQLiteBulk
from vault.stores.sqlite.documents import COUNT_LIVE_BY_KEY_ID, NEXT_KEY_ID, sqlite_timestamp
from vault.stores.sqlite.store import SQLiteStore

__all__ = ["COUNT_LIVE_BY_KEY_ID", "NEXT_KEY_ID", "SQLiteBulk", "SQLiteStore", "sqlite_timestamp"]
