"""A secret, an audit record and an outbox event as rows, and the statements that read and
write them."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Mapping, Sequence

from observability.audit import AuditRecord
from vault.errors import CorruptRecord
from vault.events import Event, PendingEvent, event_body
from vault.lifecycle import utc_now
from vault.records import DEFAULT_TENANT, NOBODY, Access, SealedSecret
from vault.stores.base import (
    AUDIT_FIELDS,
    AuditDocument,
    Settlement,
)

RECORD_COLUMNS = (
    "record_key, key_id, nonce, ciphertext, expires_at, reads_left, tenant, owner, readers,"
    " receipt_id, label, kdf, passphrase_failures"
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
    str | None,
    int | None,
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


def count_wrong_passphrase(
    conn: sqlite3.Connection, key: str, keys: Sequence[str], limit: int
) -> int | None:
    """Count one wrong passphrase of the record stored under ``key``, in the open write
    transaction: the wrong tries after this one, or None when the record is gone or at
    ``limit`` already. The try that reaches ``limit`` deletes the record in the same
    transaction, with any other row of its lookup ``keys``."""
    row = conn.execute(
        "UPDATE secrets SET passphrase_failures = passphrase_failures + 1"
        " WHERE record_key = ? AND passphrase_failures < ? RETURNING passphrase_failures",
        (key, limit),
    ).fetchone()
    if row is None:
        return None
    if row[0] >= limit:
        conn.executemany("DELETE FROM secrets WHERE record_key = ?", [(k,) for k in keys])
    return int(row[0])


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
        record.kdf,
        None if record.kdf is None else record.passphrase_failures,
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
        kdf=row[11],
        passphrase_failures=row[12] or 0,
    )


def record_or_none(row: RecordRow) -> SealedSecret | None:
    """The record a row holds, or None for a malformed one (left out, as export does)."""
    try:
        return record_of(row)
    except CorruptRecord:
        return None


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


# --- the outbox -------------------------------------------------------------------------

# An event id already stored is a retry whose first attempt landed: nothing to do.
INSERT_EVENT = (
    "INSERT INTO outbox (event_id, type, at, payload, attempts, next_attempt_at, created_at)"
    " VALUES (?, ?, ?, ?, 0, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)
EVENT_COLUMNS = "event_id, type, at, payload, attempts, created_at, delivered"
EventRow = tuple[str, str, str, str, int, str, str | None]
# Whether anything is due: a read, so that an idle deliverer never takes the write lock.
ANY_DUE = "SELECT 1 FROM outbox WHERE next_attempt_at <= ? LIMIT 1"
# Claimed in one statement, the earliest due first: each row due now gets the lease, which
# makes it due again only when the lease ends (next_attempt_at is set to its end).
CLAIM_EVENTS = (
    "UPDATE outbox SET lease_owner = ?, lease_until = ?, next_attempt_at = ?"  # noqa: S608
    " WHERE event_id IN (SELECT event_id FROM outbox WHERE next_attempt_at <= ?"
    " ORDER BY next_attempt_at LIMIT ?)"
    f" RETURNING {EVENT_COLUMNS}"
)
# Delivered to every receiver, or dropped: gone, if this deliverer still holds its lease.
REMOVE_EVENT = "DELETE FROM outbox WHERE event_id = ? AND lease_owner = ?"
RESCHEDULE_EVENT = (
    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, delivered = ?,"
    " lease_owner = NULL, lease_until = NULL WHERE event_id = ? AND lease_owner = ?"
)
OUTBOX_BACKLOG = "SELECT count(*), min(created_at) FROM outbox"


def insert_events(
    conn: sqlite3.Connection, events: Sequence[Event], now: dt.datetime | None = None
) -> None:
    """Write ``events`` to the outbox in the caller's open transaction, due at once (``now``,
    by default the store's clock, is their ``created_at``). An event id already stored is a
    retry whose first attempt landed: left as it is. Nothing is run for no events."""
    if not events:
        return
    stamp = sqlite_timestamp(utc_now() if now is None else now)
    conn.executemany(
        INSERT_EVENT,
        [(e.id, e.type, sqlite_timestamp(e.at), event_body(e), stamp, stamp) for e in events],
    )


def claim_events(
    conn: sqlite3.Connection, owner: str, now: dt.datetime, lease_seconds: float, limit: int
) -> tuple[list[PendingEvent], list[str]]:
    """Lease up to ``limit`` events due at ``now`` to ``owner`` for ``lease_seconds``, in one
    write transaction (BEGIN IMMEDIATE: one claimer at a time across processes), the
    earliest due first; with them the ids of malformed rows met, removed in the same
    transaction. Only a read when nothing is due."""
    stamp = sqlite_timestamp(now)
    if conn.execute(ANY_DUE, (stamp,)).fetchone() is None:
        return [], []
    until = sqlite_timestamp(now + dt.timedelta(seconds=lease_seconds))
    claimed: list[PendingEvent] = []
    malformed: list[str] = []
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        rows: list[EventRow] = conn.execute(
            CLAIM_EVENTS, (owner, until, until, stamp, limit)
        ).fetchall()
        for row in rows:
            try:
                claimed.append(pending_of(row))
            except (ValueError, TypeError, AttributeError):
                malformed.append(row[0])
        conn.executemany("DELETE FROM outbox WHERE event_id = ?", [(i,) for i in malformed])
    claimed.sort(key=lambda pending: (pending.created_at, pending.event.at))
    return claimed, malformed


def settle_events(conn: sqlite3.Connection, settlements: Sequence[Settlement]) -> list[bool]:
    """Apply each settlement in one write transaction: the event removed, or rescheduled
    with its attempts counted and its lease freed; for each, whether its owner still held
    the lease (else nothing was changed: another deliverer has the event now)."""
    done: list[bool] = []
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        for item in settlements:
            if item.next_attempt_at is None:
                cursor = conn.execute(REMOVE_EVENT, (item.event_id, item.owner))
            else:
                delivered = json.dumps(sorted(item.delivered_to)) if item.delivered_to else None
                cursor = conn.execute(
                    RESCHEDULE_EVENT,
                    (sqlite_timestamp(item.next_attempt_at), delivered, item.event_id, item.owner),
                )
            done.append(cursor.rowcount == 1)
    return done


def outbox_backlog(conn: sqlite3.Connection) -> tuple[int, dt.datetime | None]:
    """How many events the outbox holds, and when the oldest was written to it."""
    count, oldest = conn.execute(OUTBOX_BACKLOG).fetchone()
    return int(count), None if oldest is None else parse_timestamp(oldest)


def pending_of(row: EventRow) -> PendingEvent:
    """The outbox row as the deliverer gets it; ValueError when it is malformed."""
    event_id, kind, at, payload, attempts, created_at, delivered = row
    data = json.loads(payload).get("data")
    if not isinstance(data, dict):
        raise ValueError("an outbox event's payload is malformed")
    receivers = () if delivered is None else json.loads(delivered)
    return PendingEvent(
        Event(kind, parse_timestamp(at), data, event_id),
        payload,
        attempts,
        parse_timestamp(created_at),
        frozenset(str(digest) for digest in receivers),
    )


def parse_timestamp(value: str) -> dt.datetime:
    """A ``sqlite_timestamp`` read back."""
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
