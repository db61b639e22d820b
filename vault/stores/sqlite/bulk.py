"""Export from and import into one SQLite file, on a connection of its own."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vault.errors import CorruptRecord
from vault.records import Receipt, SealedSecret, StoredSecret
from vault.stores.base import (
    AUDIT_FIELDS,
    Imported,
    brought_forward,
    derived_record_id,
    import_keys,
    import_outcome,
    stored_for,
)
from vault.stores.sqlite.connection import (
    SCHEMA,
    connect,
    create_file,
    migrate,
)
from vault.stores.sqlite.documents import (
    INSERT_AUDIT,
    KEYED_BY_ID,
    RECORD_COLUMNS,
    RecordRow,
    audit_row,
    record_of,
    record_row,
)
from vault.stores.sqlite.receipts import ALL_RECEIPTS, MERGE_RECEIPT, receipt_of, receipt_row

# Rows per statement when importing: twice as many keys, under SQLite's 32766 host
# parameters in one IN (...).
_IMPORT_BATCH = 500
# What an import changes of a record the store holds: reads taken and wrong passphrases
# tried since, which are never given back.
_BROUGHT_FORWARD = (Imported.FEWER_READS, Imported.MORE_FAILURES)


def _created_text(value: dt.datetime) -> str:
    """``created_at`` as the column's default writes it: UTC, milliseconds."""
    utc = value.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _held(row: RecordRow) -> SealedSecret | None:
    """The record a row holds, None when it is not a whole one: an import counts that a
    conflict and never overwrites it, as on MongoDB."""
    try:
        return record_of(row)
    except CorruptRecord:
        return None


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
            create_file(path)
        self.label = f"SQLite file {str(path)!r}"
        self._conn = connect(path, timeout)
        self._conn.executescript(SCHEMA)
        migrate(self._conn)

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

    def count_keyed_by_id(self) -> int:
        count: int = self._conn.execute(
            f"SELECT COUNT(*) FROM secrets WHERE {KEYED_BY_ID}"  # noqa: S608 - fixed text
        ).fetchone()[0]
        return count

    def count_audit(self) -> int:
        count: int = self._conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        return count

    def secrets(self, now: dt.datetime) -> Iterator[StoredSecret]:
        cursor = self._conn.execute(
            f"SELECT {RECORD_COLUMNS}, created_at FROM secrets"  # noqa: S608 - fixed names
            " WHERE (expires_at IS NULL OR expires_at > ?)"
            " AND (reads_left IS NULL OR reads_left > 0) ORDER BY record_key",
            (int(now.timestamp()),),
        )
        while rows := cursor.fetchmany(_IMPORT_BATCH):
            for row in rows:
                try:
                    sealed = record_of(row[:-1])
                except CorruptRecord:
                    continue  # not a whole record (its readers edited): left out, as MongoDB's
                created = None if row[-1] is None else _parse_utc(row[-1])
                yield StoredSecret(sealed, created)

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
        keys = {key for record in records for key in import_keys(record.sealed)}
        outcomes = []
        with self._conn:  # one transaction, one fsync, for the whole batch
            self._conn.execute("BEGIN IMMEDIATE")
            stored: dict[str, SealedSecret | None] = {
                row[0]: _held(row)
                for row in self._conn.execute(
                    f"SELECT {RECORD_COLUMNS} FROM secrets"  # noqa: S608 - fixed names, "?"s
                    f" WHERE record_key IN ({', '.join('?' * len(keys))})",
                    sorted(keys),
                )
            }
            for record in records:
                sealed = record.sealed
                key, held = stored_for(sealed, stored) or (sealed.record_key, None)
                if held is None and key in stored:
                    outcomes.append(Imported.CONFLICT)  # malformed: never overwritten
                    continue
                outcome = import_outcome(held, sealed)
                if outcome is Imported.NEW:
                    self._conn.execute(
                        f"INSERT INTO secrets ({RECORD_COLUMNS}, created_at)"  # noqa: S608
                        f" VALUES ({', '.join('?' * len(RECORD_COLUMNS.split(',')))},"
                        " coalesce(?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
                        (
                            *record_row(sealed),
                            None if record.created_at is None else _created_text(record.created_at),
                        ),
                    )
                    stored[key] = sealed  # the same record twice in one file
                elif outcome in _BROUGHT_FORWARD and held is not None:
                    merged = brought_forward(held, sealed)  # read in this transaction
                    failures = None if merged.kdf is None else merged.passphrase_failures
                    self._conn.execute(
                        "UPDATE secrets SET reads_left = ?, passphrase_failures = ?"
                        " WHERE record_key = ?",
                        (merged.reads_left, failures, key),
                    )
                    stored[key] = merged
                outcomes.append(outcome)
        return outcomes

    def add_audit(self, documents: Iterable[Mapping[str, Any]]) -> int:
        rows = [audit_row(document) for document in documents]
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            before = self._conn.total_changes
            self._conn.executemany(INSERT_AUDIT, rows)  # a stored record_id: DO NOTHING
            return self._conn.total_changes - before

    def count_receipts(self) -> int:
        count: int = self._conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
        return count

    def receipts(self) -> Iterator[Receipt]:
        cursor = self._conn.execute(ALL_RECEIPTS)
        while rows := cursor.fetchmany(_IMPORT_BATCH):
            for row in rows:
                try:
                    yield receipt_of(row)
                except (TypeError, ValueError, OverflowError, OSError):
                    continue  # a time that is no number (an edit): not a whole receipt

    def add_receipts(self, receipts: Sequence[Receipt]) -> int:
        keys = sorted({receipt.receipt_key for receipt in receipts})
        with self._conn:  # one transaction, one fsync, for the whole batch
            self._conn.execute("BEGIN IMMEDIATE")
            stored: set[str] = set()
            for start in range(0, len(keys), _IMPORT_BATCH):
                chunk = keys[start : start + _IMPORT_BATCH]
                stored.update(
                    row[0]
                    for row in self._conn.execute(
                        "SELECT receipt_key FROM receipts"  # noqa: S608 - fixed names, "?"s
                        f" WHERE receipt_key IN ({', '.join('?' * len(chunk))})",
                        chunk,
                    )
                )
            self._conn.executemany(MERGE_RECEIPT, [receipt_row(r) for r in receipts])
        return len(keys) - len(stored)
