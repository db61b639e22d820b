"""A secret and an audit record as rows, and the statements that read and write them."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Mapping, Sequence

from observability.audit import AuditRecord
from vault.errors import CorruptRecord
from vault.records import DEFAULT_TENANT, NOBODY, Access, SealedSecret
from vault.stores.base import (
    AUDIT_FIELDS,
    AuditDocument,
)

RECORD_COLUMNS = (
    "record_key, key_id, nonce, ciphertext, expires_at, reads_left, tenant, owner, readers,"
    " receipt_id, label"
)
INSERT_RECORD = (
    f"INSERT INTO secrets ({RECORD_COLUMNS})"  # noqa: S608 - fixed column names only
    f" VALUES ({', '.join('?' * len(RECORD_COLUMNS.split(',')))})"
)


# A record still stored under its secret id (vault/records.py LEGACY_KEY_LENGTH), in SQL.
KEYED_BY_ID = "length(record_key) = 36"
RecordRow = tuple[
    str,
    str,
    bytes,
    bytes,
    int | None,
    int | None,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
]


# A record_id already stored is a retry whose first attempt landed: nothing to do. Only
# that conflict is ignored (not OR IGNORE, which would also drop a row breaking NOT NULL).
INSERT_AUDIT = (
    f"INSERT INTO audit ({', '.join(AUDIT_FIELDS)})"  # noqa: S608 - fixed column names only
    f" VALUES ({', '.join('?' * len(AUDIT_FIELDS))})"
    " ON CONFLICT (record_id) DO NOTHING"
)


AuditRow = tuple[object, ...]


# The key guard's two statements, each answered from the index secrets_key_id (a test reads
# their EXPLAIN QUERY PLAN): the next distinct key id after the last one found is one seek,
# so finding every id costs a seek per id, however many records there are.
NEXT_KEY_ID = "SELECT key_id FROM secrets WHERE key_id > ? ORDER BY key_id LIMIT 1"
COUNT_LIVE_BY_KEY_ID = (
    "SELECT count(*) FROM secrets WHERE key_id = ?"
    " AND (expires_at IS NULL OR expires_at > ?) AND (reads_left IS NULL OR reads_left > 0)"
)


def audit_row(document: AuditDocument) -> AuditRow:
    """The row for a document, in AUDIT_FIELDS order; KeyError or AttributeError when a
    field is missing or ``ts`` is no datetime."""
    return tuple(
        sqlite_timestamp(document[name]) if name == "ts" else document[name]
        for name in AUDIT_FIELDS
    )


def take_read(conn: sqlite3.Connection, key: str, keys: Sequence[str]) -> RecordRow | None:
    """Take one read of the read-limited record stored under ``key``, in the open write
    transaction: the record with the reads left after this one, or None when it is gone or
    used up. The last read deletes the row in the same transaction, with any other row of
    the secret's lookup ``keys`` (a legacy row beside its converted one), which would
    otherwise serve the secret again."""
    row: RecordRow | None = conn.execute(
        "UPDATE secrets SET reads_left = reads_left - 1"  # noqa: S608 - fixed names
        f" WHERE record_key = ? AND reads_left > 0 RETURNING {RECORD_COLUMNS}",
        (key,),
    ).fetchone()
    if row is not None and row[5] == 0:
        conn.executemany("DELETE FROM secrets WHERE record_key = ?", [(k,) for k in keys])
    return row


def insert_each(
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


MALFORMED_AUDIT = (KeyError, AttributeError, TypeError)  # what audit_row raises


def insert_audits(
    conn: sqlite3.Connection, audits: Mapping[int, AuditRecord]
) -> dict[int, Exception | None]:
    """Insert the audit records riding with a batch, in its open transaction: each one's
    error (None: written once the transaction commits), by its item's index."""
    errors: dict[int, Exception | None] = {}
    for k, audit in audits.items():
        try:
            row = audit_row(audit.as_document())
        except MALFORMED_AUDIT as exc:  # refused alone
            errors[k] = exc
            continue
        errors[k] = insert_each(conn, INSERT_AUDIT, [row])[0]
    return errors


def epoch(value: dt.datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def record_row(record: SealedSecret) -> RecordRow:
    """The row a record is stored as (RECORD_COLUMNS): a record of the default tenant for
    no named readers has NULL there, as rows written before tenants existed."""
    return (
        record.record_key,
        record.key_id,
        record.nonce,
        record.ciphertext,
        epoch(record.expires_at),
        record.reads_left,
        None if record.tenant == DEFAULT_TENANT else record.tenant,
        record.owner,
        None if record.readers is None else json.dumps(list(record.readers)),
        record.receipt_id,
        record.label,
    )


def record_of(row: RecordRow) -> SealedSecret:
    """The record a row holds; CorruptRecord when its readers are malformed."""
    key, key_id, nonce, ciphertext, expires_at, reads_left = row[:6]
    try:
        tenant, owner, readers = access_of(row[6:9])
    except ValueError:
        # The message names no values: the row may hold anything.
        raise CorruptRecord("a stored secret record is malformed") from None
    return SealedSecret(
        key,
        key_id,
        nonce,
        ciphertext,
        expires_at=None if expires_at is None else dt.datetime.fromtimestamp(expires_at, dt.UTC),
        reads_left=reads_left,
        tenant=tenant,
        owner=owner,
        readers=readers,
        receipt_id=row[9],
        label=row[10],
    )


def access_of(columns: Sequence[str | None]) -> Access:
    """Who may see a row's secret from its tenant, owner and readers columns; ValueError
    when readers is no JSON array of names."""
    tenant, owner, readers = columns
    names = None if readers is None else json.loads(readers)
    if names is not None and not (
        isinstance(names, list) and all(isinstance(name, str) for name in names)
    ):
        raise ValueError("a stored secret's readers are malformed")
    return Access(
        DEFAULT_TENANT if tenant is None else tenant,
        owner,
        None if names is None else tuple(names),
    )


def guard_of(columns: Sequence[str | None]) -> Access:
    """Who may see a row's secret, NOBODY when that cannot be read: a delete's check,
    which must not fail on a row malformed elsewhere."""
    try:
        return access_of(columns)
    except ValueError:
        return NOBODY


def sqlite_timestamp(value: dt.datetime) -> str:
    """UTC, fixed width, so timestamps compare correctly as text."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
