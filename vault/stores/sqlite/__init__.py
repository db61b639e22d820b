"""Embedded default store: one SQLite file under DATA_DIR, in WAL mode, off the event loop.

It is what a newcomer gets with no database. ``synchronous=FULL`` makes every committed
insert survive a power loss, so an acknowledged create is never lost. A small pool of
connections lets reads run beside a write (WAL allows that); SQLite serialises writers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import queue
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from observability.audit import AuditRecord
from vault.errors import NotReady, StoreUnavailable
from vault.lifecycle import Opener, takes_a_read
from vault.records import SealedSecret, StoredSecret
from vault.stores.base import (
    AUDIT_FIELDS,
    AuditDocument,
    AuditWrite,
    DeleteResult,
    FetchResult,
    Imported,
    derived_record_id,
    fetch_results,
    import_outcome,
    insert_results,
    judge_each,
    run_off_loop,
    stamped_audits,
    store_executor,
    stored_or_refused,
    unavailable,
    utc_now,
)
from vault.stores.batching import Batcher
from vault.stores.health import DISK_FULL, REFUSING_WRITES, UNREACHABLE, WriteHealth, stored_any

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    secret_id  TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    expires_at INTEGER,  -- Unix seconds; NULL: never expires
    reads_left INTEGER   -- NULL: no read limit
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS secrets_key_id ON secrets (key_id);
CREATE TABLE IF NOT EXISTS audit (
    id             INTEGER PRIMARY KEY,
    ts             TEXT NOT NULL,
    op             TEXT NOT NULL,
    status         INTEGER NOT NULL,
    outcome        TEXT NOT NULL,
    client_ip      TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    secret_id_hmac TEXT,
    latency_ms     REAL NOT NULL,
    user_agent     TEXT,
    api_key_name   TEXT,
    record_id      TEXT
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
-- One row the readiness probe rewrites to learn whether writes work; never a secret.
CREATE TABLE IF NOT EXISTS readiness (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at TEXT NOT NULL
);
-- What the probe rewrites too while writes fail, to prove a create fits again: as many
-- random bytes as the largest create writes pages for; never a secret.
CREATE TABLE IF NOT EXISTS readiness_room (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    bytes BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_secret_id_hmac ON audit (secret_id_hmac);
"""

_INSERT_RECORD = (
    "INSERT INTO secrets (secret_id, key_id, nonce, ciphertext, expires_at, reads_left)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_RECORD_COLUMNS = "secret_id, key_id, nonce, ciphertext, expires_at, reads_left"
RecordRow = tuple[str, str, bytes, bytes, int | None, int | None]
# A record_id already stored is a retry whose first attempt landed: nothing to do. Only
# that conflict is ignored (not OR IGNORE, which would also drop a row breaking NOT NULL).
_INSERT_AUDIT = (
    f"INSERT INTO audit ({', '.join(AUDIT_FIELDS)})"  # noqa: S608 - fixed column names only
    f" VALUES ({', '.join('?' * len(AUDIT_FIELDS))})"
    " ON CONFLICT (record_id) DO NOTHING"
)
AuditRow = tuple[object, ...]
# A create's batch item: its record, and the audit record to write once it is stored.
_Insert = tuple[SealedSecret, AuditRecord | None]
# A fetch's batch item: the id, what opens the record, and the audit record to write.
_Fetch = tuple[str, Opener, AuditRecord | None]
# The key guard's two statements, each answered from the index secrets_key_id (a test reads
# their EXPLAIN QUERY PLAN): the next distinct key id after the last one found is one seek,
# so finding every id costs a seek per id, however many records there are.
NEXT_KEY_ID = "SELECT key_id FROM secrets WHERE key_id > ? ORDER BY key_id LIMIT 1"
COUNT_LIVE_BY_KEY_ID = (
    "SELECT count(*) FROM secrets WHERE key_id = ?"
    " AND (expires_at IS NULL OR expires_at > ?) AND (reads_left IS NULL OR reads_left > 0)"
)
# The WAL is cut back to this size whenever a checkpoint resets it, so the space a burst of
# writes took is given back instead of held by a WAL file that only ever grows.
JOURNAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
PING_TIMEOUT_SECONDS = 2.0  # readiness probes (a balancer, Swarm) give up after a few seconds
_PROBE = (
    "INSERT INTO readiness (id, checked_at) VALUES (1, ?)"
    " ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at"
)
# Random, so that rewriting the row changes every page it spans: SQLite skips writing a page
# an update leaves as it was, and such a probe would write almost nothing.
_PROBE_ROOM = (
    "INSERT INTO readiness_room (id, bytes) VALUES (1, randomblob(?))"
    " ON CONFLICT (id) DO UPDATE SET bytes = excluded.bytes"
)
# The pages a create writes beside its record's bytes: the leaves of the secrets table and
# its two indexes, and of the audit table and its three (its audit record, same transaction).
_CREATE_PAGES_BESIDE_RECORD = 7
_PAGE_BYTES = 4096  # SQLite's default page size, which the store keeps


def _reason(exc: Exception) -> str:
    """What /readyz says when a write failed with ``exc`` that names no reason of its own
    (it ran out of its time budget, or failed unexpectedly)."""
    return REFUSING_WRITES


def _unavailable(exc: sqlite3.OperationalError) -> StoreUnavailable:
    """Locked, read-only, out of disk or unreadable: transient from the caller's view; the
    reason says which for /readyz."""
    name = exc.sqlite_errorname
    return StoreUnavailable(
        f"sqlite: {name}", reason=DISK_FULL if name == "SQLITE_FULL" else REFUSING_WRITES
    )


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database file and truncate it to zero bytes, giving its space
    back to the file system; best effort (it cannot run while another connection writes)."""
    with suppress(sqlite3.Error):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _audit_row(document: AuditDocument) -> AuditRow:
    """The row for a document, in AUDIT_FIELDS order; KeyError or AttributeError when a
    field is missing or ``ts`` is no datetime."""
    return tuple(
        sqlite_timestamp(document[name]) if name == "ts" else document[name]
        for name in AUDIT_FIELDS
    )


def _take_read(conn: sqlite3.Connection, secret_id: str) -> RecordRow | None:
    """Take one read of a read-limited record, in the open write transaction: the record
    with the reads left after this one, or None when it is gone or used up. The last read
    deletes the row in the same transaction."""
    row: RecordRow | None = conn.execute(
        "UPDATE secrets SET reads_left = reads_left - 1"  # noqa: S608 - fixed names
        f" WHERE secret_id = ? AND reads_left > 0 RETURNING {_RECORD_COLUMNS}",
        (secret_id,),
    ).fetchone()
    if row is not None and row[5] == 0:
        conn.execute("DELETE FROM secrets WHERE secret_id = ?", (secret_id,))
    return row


def _insert_each(
    conn: sqlite3.Connection, statement: str, rows: Sequence[Sequence[object]]
) -> list[Exception | None]:
    """Run ``statement`` for each row in the open transaction; one entry per row: None, or
    the IntegrityError that rolled back that row alone."""
    results: list[Exception | None] = []
    for row in rows:
        try:
            conn.execute(statement, row)
        except sqlite3.IntegrityError as exc:
            results.append(exc)
        else:
            results.append(None)
    return results


_MALFORMED_AUDIT = (KeyError, AttributeError, TypeError)  # what _audit_row raises


def _insert_audits(
    conn: sqlite3.Connection, audits: Mapping[int, AuditRecord]
) -> dict[int, Exception | None]:
    """Insert the audit records riding with a batch, in its open transaction: each one's
    error (None: written once the transaction commits), by its item's index."""
    errors: dict[int, Exception | None] = {}
    for k, audit in audits.items():
        try:
            row = _audit_row(audit.as_document())
        except _MALFORMED_AUDIT as exc:  # refused alone
            errors[k] = exc
            continue
        errors[k] = _insert_each(conn, _INSERT_AUDIT, [row])[0]
    return errors


def _epoch(value: dt.datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def _sealed(row: RecordRow) -> SealedSecret:
    secret_id, key_id, nonce, ciphertext, expires_at, reads_left = row
    return SealedSecret(
        secret_id,
        key_id,
        nonce,
        ciphertext,
        expires_at=None if expires_at is None else dt.datetime.fromtimestamp(expires_at, dt.UTC),
        reads_left=reads_left,
    )


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file written by an earlier version up to the current schema."""
    secret_columns = {row[1] for row in conn.execute("PRAGMA table_info(secrets)")}
    for column in ("expires_at", "reads_left"):
        if column not in secret_columns:
            conn.execute(f"ALTER TABLE secrets ADD COLUMN {column} INTEGER")
    conn.execute("CREATE INDEX IF NOT EXISTS secrets_expires_at ON secrets (expires_at)")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(audit)")}
    if "api_key_name" not in columns:
        conn.execute("ALTER TABLE audit ADD COLUMN api_key_name TEXT")
    if "record_id" not in columns:
        conn.execute("ALTER TABLE audit ADD COLUMN record_id TEXT")  # NULL in older rows
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS audit_record_id ON audit (record_id)")


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # A deleted secret's row (delete, last read, purge) is overwritten with zeros in the
    # database file instead of lingering in a free page until it is reused.
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
    return conn


def _create_file(path: Path) -> None:
    """The database file, readable by this user only, with the current schema."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))


def sqlite_timestamp(value: dt.datetime) -> str:
    """UTC, fixed width, so timestamps compare correctly as text."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SQLiteStore:
    """Secrets in the ``secrets`` table of one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        timeout: float,
        max_secret_bytes: int,
        connections: int = 4,
    ) -> None:
        self._path = path
        self._timeout = timeout
        self._size = connections
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._executor: ThreadPoolExecutor | None = None
        self.health = WriteHealth()  # what /readyz reports: do writes work?
        # What the probe writes while writes fail: at least the pages the largest create does.
        self._probe_room = max_secret_bytes + _CREATE_PAGES_BESIDE_RECORD * _PAGE_BYTES
        # Concurrent creates share one transaction, concurrent fetches one query.
        self._inserts = Batcher(self._insert_batch, operation="insert", timeout=timeout + 1.0)
        self._reads = Batcher(self._fetch_batch, operation="read", timeout=timeout + 1.0)
        self._audits = Batcher(
            self._insert_audit_batch, operation="insert_audit", timeout=timeout + 1.0
        )

    def _connect(self) -> sqlite3.Connection:
        return _connect(self._path, self._timeout)

    def _open_sync(self) -> None:
        _create_file(self._path)
        first = self._connect()
        first.executescript(_SCHEMA)
        _migrate(first)
        self._pool.put(first)
        for _ in range(self._size - 1):
            self._pool.put(self._connect())

    async def open(self) -> None:
        self._executor = store_executor(self._size, "sqlite")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open_sync)

    async def close(self) -> None:
        await self._inserts.close()
        await self._reads.close()
        await self._audits.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        while not self._pool.empty():
            self._pool.get_nowait().close()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        conn = self._pool.get()
        try:
            yield conn
        finally:
            self._pool.put(conn)

    async def _run(
        self,
        operation: str,
        func: Callable[[sqlite3.Connection], T],
        *,
        write: bool = False,
        proves: bool | Callable[[T], bool] = False,
        timeout: float | None = None,
    ) -> T:
        """Run ``func`` on a pooled connection off the loop. A ``write``'s failure is
        reported to ``self.health``, and so is its success when ``proves`` says it shows
        writes work (a write as large as a create; see vault/stores/health.py)."""
        executor = self._executor
        if executor is None:
            raise RuntimeError("store used before open()")

        def call() -> T:
            with self._connection() as conn:
                try:
                    return func(conn)
                except sqlite3.OperationalError as exc:
                    if conn.in_transaction:  # a failed COMMIT may leave one open: not pooled
                        with suppress(sqlite3.Error):
                            conn.rollback()
                    if exc.sqlite_errorname == "SQLITE_FULL":
                        # Frees what the WAL holds, so space an operator frees stays free.
                        _checkpoint(conn)
                    raise

        async def run() -> T:
            try:
                return await run_off_loop(
                    call,
                    executor=executor,
                    timeout=self._timeout + 1.0 if timeout is None else timeout,
                    operation=operation,
                    system="sqlite",
                )
            except sqlite3.OperationalError as exc:
                raise _unavailable(exc) from None

        if write:
            return await self.health.track(run(), _reason, proves=proves)
        return await run()

    async def _insert_batch(self, items: list[_Insert]) -> list[AuditWrite | Exception | None]:
        rows = [
            (r.secret_id, r.key_id, r.nonce, r.ciphertext, _epoch(r.expires_at), r.reads_left)
            for r, _ in items
        ]

        def insert(conn: sqlite3.Connection) -> list[AuditWrite | Exception | None]:
            with conn:  # one transaction, one fsync: the batch and its audit records
                conn.execute("BEGIN IMMEDIATE")
                results = _insert_each(conn, _INSERT_RECORD, rows)
                audits = stamped_audits(items, results)
                errors = _insert_audits(conn, audits)
            return insert_results(results, audits, errors)  # only now: committed, durable

        return await self._run("insert", insert, write=True, proves=stored_any)

    async def insert(
        self, record: SealedSecret, audit: AuditRecord | None = None
    ) -> AuditWrite | None:
        written: AuditWrite | None = await self._inserts.submit((record, audit))
        return written

    def _select(self, conn: sqlite3.Connection, secret_ids: list[str]) -> dict[str, SealedSecret]:
        wanted = list(dict.fromkeys(secret_ids))  # concurrent fetches of one id: read it once
        placeholders = ", ".join("?" * len(wanted))  # at most MAX_BATCH, under SQLite's cap
        rows: list[RecordRow] = conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM secrets"  # noqa: S608 - fixed names and "?"s
            f" WHERE secret_id IN ({placeholders})",
            wanted,
        ).fetchall()
        return {row[0]: _sealed(row) for row in rows}

    def _fetch_sync(
        self, conn: sqlite3.Connection, items: list[_Fetch]
    ) -> list[FetchResult | Exception]:
        """A batch of fetches in one call: one answer per item."""
        secret_ids = [secret_id for secret_id, _, _ in items]
        now = utc_now()
        found = self._select(conn, secret_ids)
        records: list[SealedSecret | None] = [found.get(i) for i in secret_ids]
        limited = [k for k, record in enumerate(records) if takes_a_read(record, now)]
        if not limited:
            results, audits = judge_each(items, records, now)
            if all(audit is None for audit in audits):
                return fetch_results(results, audits, {})  # a pure read: no transaction
        with conn:  # one transaction, one fsync: the reads taken and the audit records
            conn.execute("BEGIN IMMEDIATE")
            for k in limited:  # each its own atomic take
                row = _take_read(conn, secret_ids[k])
                records[k] = None if row is None else _sealed(row)
            if limited:  # judged only now, on the records as the takes left them
                results, audits = judge_each(items, records, now)
            errors = _insert_audits(
                conn, {k: audit for k, audit in enumerate(audits) if audit is not None}
            )
        return fetch_results(results, audits, errors)  # committed, durable

    async def _fetch_batch(self, items: list[_Fetch]) -> list[FetchResult | Exception]:
        answers: list[FetchResult | Exception] = await self.health.track_writes(
            self._run("read", lambda conn: self._fetch_sync(conn, items)),
            _reason,
            writes=any(audit is not None for _, _, audit in items),
        )
        return answers

    async def fetch(
        self, secret_id: str, opener: Opener, audit: AuditRecord | None = None
    ) -> FetchResult:
        result: FetchResult = await self._reads.submit((secret_id, opener, audit))
        return result

    async def delete(self, secret_id: str) -> DeleteResult:
        def remove(conn: sqlite3.Connection) -> tuple[int | None, int | None] | None:
            found: tuple[int | None, int | None] | None = conn.execute(
                "DELETE FROM secrets WHERE secret_id = ? RETURNING expires_at, reads_left",
                (secret_id,),
            ).fetchone()
            return found

        found = await self._run("delete", remove, write=True)
        if found is None or found[1] == 0:
            return DeleteResult.MISSING
        expires_at, _ = found
        if expires_at is not None and utc_now().timestamp() >= expires_at:
            return DeleteResult.EXPIRED
        return DeleteResult.DELETED

    async def purge_expired(self) -> int:
        now = int(utc_now().timestamp())

        def purge(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM secrets WHERE expires_at <= ? OR reads_left = 0", (now,)
            )
            _checkpoint(conn)  # periodically, so the WAL gives its space back between bursts
            return cursor.rowcount

        return await self._run("purge_expired", purge, write=True)

    async def prepare_rewrap(self) -> None:
        """Nothing to do: the schema already indexes ``key_id``."""

    async def records_not_sealed_by(
        self, key_id: str, after_secret_id: str, limit: int
    ) -> list[SealedSecret]:
        if limit < 1:
            raise ValueError("limit must be at least 1")

        def select(conn: sqlite3.Connection) -> list[RecordRow]:
            rows: list[RecordRow] = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM secrets"  # noqa: S608 - fixed names only
                " WHERE key_id <> ? AND secret_id > ? ORDER BY secret_id LIMIT ?",
                (key_id, after_secret_id, limit),
            ).fetchall()
            return rows

        return [_sealed(row) for row in await self._run("rewrap_find", select)]

    async def replace_sealed(self, old: SealedSecret, new: SealedSecret) -> bool:
        if new.secret_id != old.secret_id:
            raise ValueError("a record can only be replaced by a record with its own id")

        def replace(conn: sqlite3.Connection) -> bool:
            # One statement in autocommit mode: atomic, and durable (synchronous=FULL).
            cursor = conn.execute(
                "UPDATE secrets SET key_id = ?, nonce = ?, ciphertext = ?"
                " WHERE secret_id = ? AND key_id = ? AND nonce = ?",
                (new.key_id, new.nonce, new.ciphertext, old.secret_id, old.key_id, old.nonce),
            )
            return cursor.rowcount == 1

        return await self._run("rewrap_replace", replace, write=True)

    async def count_not_sealed_by(self, key_id: str) -> int:
        def count(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT count(*) FROM secrets WHERE key_id <> ?", (key_id,))
            return int(row.fetchone()[0])

        return await self._run("rewrap_count", count)

    async def unknown_key_counts(self, known_key_ids: Collection[str]) -> dict[str, int]:
        known = frozenset(known_key_ids)
        now = int(utc_now().timestamp())

        def count(conn: sqlite3.Connection) -> dict[str, int]:
            counts: dict[str, int] = {}
            last = ""  # below every key id: ids are hex digits
            while (row := conn.execute(NEXT_KEY_ID, (last,)).fetchone()) is not None:
                last = row[0]
                if last in known:
                    continue
                live = int(conn.execute(COUNT_LIVE_BY_KEY_ID, (last, now)).fetchone()[0])
                if live:  # an id left only on expired or used-up records opens nothing wanted
                    counts[last] = live
            return counts

        return await self._run("key_id_counts", count)

    async def _insert_audit_batch(self, rows: list[AuditRow]) -> list[Exception | None]:
        def insert(conn: sqlite3.Connection) -> list[Exception | None]:
            with conn:  # one transaction, one fsync, for the whole batch
                conn.execute("BEGIN IMMEDIATE")
                return _insert_each(conn, _INSERT_AUDIT, rows)

        try:
            return await self._run("insert_audit", insert, write=True)
        except Exception as exc:  # the whole call failed: every record in it may be retried
            raise unavailable(exc) from exc

    async def insert_audit(self, record: AuditRecord) -> Exception | None:
        try:
            row = _audit_row(record.as_document())
        except _MALFORMED_AUDIT as exc:  # refused alone
            return exc
        return await stored_or_refused(self._audits.submit(row))

    async def apply_audit_retention(self, ttl_days: int) -> None:
        """Delete records older than the retention (SQLite has no TTL index)."""
        if ttl_days <= 0:
            return
        cutoff = sqlite_timestamp(dt.datetime.now(dt.UTC) - dt.timedelta(days=ttl_days))
        await self._run(
            "audit_retention",
            lambda conn: conn.execute("DELETE FROM audit WHERE ts < ?", (cutoff,)),
            write=True,
        )

    async def _probe(self) -> None:
        """The readiness probe's write: the one row of ``readiness``, and while writes fail
        also the row of ``readiness_room``, as large as the largest create, in one durable
        transaction as a create's. Only that proves a create fits again: a small write can
        land in pages a refused create left allocated. Its outcome goes to self.health."""
        failing = self.health.failing
        stamp = sqlite_timestamp(utc_now())
        room = self._probe_room if failing is not None else 0

        def probe(conn: sqlite3.Connection) -> None:
            if failing == DISK_FULL:
                _checkpoint(conn)  # give back what the WAL holds before trying again
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(_PROBE, (stamp,))
                if room:
                    conn.execute(_PROBE_ROOM, (room,))

        # A failure is not raised here: its reason is in self.health, which ping raises.
        with suppress(StoreUnavailable):
            await self._run(
                "readiness_probe",
                probe,
                write=True,
                proves=bool(room),
                timeout=PING_TIMEOUT_SECONDS,
            )

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the file answers and writes work (NotReady then,
        with the reason). With no write telling anything in the last second, the probe
        writes itself (``_probe``), so it sees writes work again (or not) while no traffic
        comes."""
        if self.health.claim_probe():
            await self._probe()
        else:
            try:
                await self._run(
                    "ping",
                    lambda conn: conn.execute("SELECT 1").fetchone(),
                    timeout=PING_TIMEOUT_SECONDS,
                )
            except StoreUnavailable:
                raise NotReady(UNREACHABLE) from None
        self.health.raise_if_failing()


# Rows per statement when importing: under SQLite's 999 host parameters in one IN (...).
_IMPORT_BATCH = 500


def _created_text(value: dt.datetime) -> str:
    """``created_at`` as the column's default writes it: UTC, milliseconds."""
    utc = value.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _parse_utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(dt.UTC)


class SQLiteBulk:
    """Export from and import into one SQLite file (``BulkStore``), on its own connection.

    An export reads inside one read transaction: WAL gives it a snapshot, so a file taken
    while the server writes is the store as of one instant. Imports write a batch per
    transaction, each durable (``synchronous=FULL``) before the next begins.
    """

    def __init__(self, path: Path, *, create: bool, timeout: float) -> None:
        """Open ``path``; when it does not exist, create it only if ``create`` (an import),
        else FileNotFoundError (an export of nothing is a mistake, not an empty file)."""
        if not path.is_file():
            if not create:
                raise FileNotFoundError(path)
            _create_file(path)
        self.label = f"SQLite file {str(path)!r}"
        self._conn = _connect(path, timeout)
        self._conn.executescript(_SCHEMA)
        _migrate(self._conn)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Everything read inside sees the store as of one instant."""
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def count_secrets(self) -> int:
        count: int = self._conn.execute("SELECT COUNT(*) FROM secrets").fetchone()[0]
        return count

    def count_audit(self) -> int:
        count: int = self._conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        return count

    def secrets(self, now: dt.datetime) -> Iterator[StoredSecret]:
        cursor = self._conn.execute(
            f"SELECT {_RECORD_COLUMNS}, created_at FROM secrets"  # noqa: S608 - fixed names
            " WHERE (expires_at IS NULL OR expires_at > ?)"
            " AND (reads_left IS NULL OR reads_left > 0) ORDER BY secret_id",
            (int(now.timestamp()),),
        )
        while rows := cursor.fetchmany(_IMPORT_BATCH):
            for row in rows:
                created = None if row[6] is None else _parse_utc(row[6])
                yield StoredSecret(_sealed(row[:6]), created)

    def audit(self) -> Iterator[dict[str, Any]]:
        cursor = self._conn.execute(
            f"SELECT {', '.join(AUDIT_FIELDS)} FROM audit ORDER BY id"  # noqa: S608
        )
        while rows := cursor.fetchmany(_IMPORT_BATCH):
            for row in rows:
                document = dict(zip(AUDIT_FIELDS, row, strict=True))
                if document["record_id"] is None:  # written before records carried one
                    document["record_id"] = derived_record_id(document)
                document["ts"] = _parse_utc(document["ts"])
                yield document

    def add_secrets(self, records: Sequence[StoredSecret]) -> list[Imported]:
        outcomes: list[Imported] = []
        for start in range(0, len(records), _IMPORT_BATCH):
            outcomes += self._add_secret_batch(records[start : start + _IMPORT_BATCH])
        return outcomes

    def _add_secret_batch(self, records: Sequence[StoredSecret]) -> list[Imported]:
        ids = [record.sealed.secret_id for record in records]
        outcomes = []
        with self._conn:  # one transaction, one fsync, for the whole batch
            self._conn.execute("BEGIN IMMEDIATE")
            stored = {
                row[0]: _sealed(row)
                for row in self._conn.execute(
                    f"SELECT {_RECORD_COLUMNS} FROM secrets"  # noqa: S608 - fixed names, "?"s
                    f" WHERE secret_id IN ({', '.join('?' * len(ids))})",
                    ids,
                )
            }
            for record in records:
                sealed = record.sealed
                outcome = import_outcome(stored.get(sealed.secret_id), sealed)
                if outcome is Imported.NEW:
                    self._conn.execute(
                        "INSERT INTO secrets (secret_id, key_id, nonce, ciphertext, expires_at,"
                        " reads_left, created_at) VALUES (?, ?, ?, ?, ?, ?,"
                        " coalesce(?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
                        (
                            sealed.secret_id,
                            sealed.key_id,
                            sealed.nonce,
                            sealed.ciphertext,
                            _epoch(sealed.expires_at),
                            sealed.reads_left,
                            None if record.created_at is None else _created_text(record.created_at),
                        ),
                    )
                    stored[sealed.secret_id] = sealed  # the same id twice in one file
                elif outcome is Imported.FEWER_READS:
                    self._conn.execute(
                        "UPDATE secrets SET reads_left = ? WHERE secret_id = ?",
                        (sealed.reads_left, sealed.secret_id),
                    )
                    stored[sealed.secret_id] = sealed
                outcomes.append(outcome)
        return outcomes

    def add_audit(self, documents: Iterable[Mapping[str, Any]]) -> int:
        rows = [_audit_row(document) for document in documents]
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            before = self._conn.total_changes
            self._conn.executemany(_INSERT_AUDIT, rows)  # a stored record_id: DO NOTHING
            return self._conn.total_changes - before
