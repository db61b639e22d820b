"""Receipts as rows: written in the transaction of the change they record."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Sequence

from vault.lifecycle import ReceiptChange
from vault.records import Receipt, ReceiptState

_COLUMNS = (
    "receipt_key, tenant, label, created_at, expires_at, max_reads, reads, first_read_at,"
    " last_read_at, ended_at, state, passphrase_failures"
)


def _seconds(moment: dt.datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _moment(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.UTC)


ReceiptRow = tuple[
    str, str, str | None, float, int | None, int | None, int, float | None, float | None,
    float | None, str, int | None,
]  # fmt: skip


def receipt_row(r: Receipt) -> ReceiptRow:
    """The row a receipt is stored as (``_COLUMNS``)."""
    return (
        r.receipt_key,
        r.tenant,
        r.label,
        r.created_at.timestamp(),
        None if r.expires_at is None else int(r.expires_at.timestamp()),
        r.max_reads,
        r.reads,
        _seconds(r.first_read_at),
        _seconds(r.last_read_at),
        _seconds(r.ended_at),
        r.state,
        r.passphrase_failures,
    )


def insert_receipts(conn: sqlite3.Connection, receipts: Sequence[Receipt]) -> None:
    """Store new receipts in the open transaction."""
    conn.executemany(
        f"INSERT INTO receipts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
        [receipt_row(r) for r in receipts],
    )


# An import's: a receipt not stored yet is inserted; one stored for the same tenant is
# brought forward, never back (more reads, the earlier first and later last read, an end
# where it had none: a secret ends once). In the SET, bare names are the stored row's.
MERGE_RECEIPT = (
    f"INSERT INTO receipts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
    " ON CONFLICT (receipt_key) DO UPDATE SET"
    " reads = max(reads, excluded.reads),"
    " first_read_at = coalesce(min(first_read_at, excluded.first_read_at), first_read_at,"
    " excluded.first_read_at),"
    " last_read_at = coalesce(max(last_read_at, excluded.last_read_at), last_read_at,"
    " excluded.last_read_at),"
    " passphrase_failures = CASE WHEN excluded.passphrase_failures"
    " > coalesce(passphrase_failures, -1) THEN excluded.passphrase_failures"
    " ELSE passphrase_failures END,"
    " state = CASE WHEN ended_at IS NULL THEN excluded.state ELSE state END,"
    " ended_at = coalesce(ended_at, excluded.ended_at)"
    " WHERE tenant = excluded.tenant"
)


def apply_changes(conn: sqlite3.Connection, changes: Sequence[ReceiptChange]) -> None:
    """Record reads and ends in the open transaction: counts add up and the last read's
    time is the latest under any concurrency; a secret ends once (the first end wins)."""
    for change in changes:
        at = change.at.timestamp()
        if change.read:
            conn.execute(
                "UPDATE receipts SET reads = reads + 1,"
                " first_read_at = coalesce(first_read_at, ?),"
                " last_read_at = max(coalesce(last_read_at, ?), ?)"
                " WHERE receipt_key = ?",
                (at, at, at, change.receipt_key),
            )
        if change.failed:
            conn.execute(
                "UPDATE receipts SET passphrase_failures = passphrase_failures + 1"
                " WHERE receipt_key = ?",
                (change.receipt_key,),
            )
        ended = ReceiptState.USED_UP if change.used_up else change.ended
        if ended is not None:
            conn.execute(
                "UPDATE receipts SET state = ?, ended_at = ?"
                " WHERE receipt_key = ? AND ended_at IS NULL",
                (ended, at, change.receipt_key),
            )


def get_receipt(conn: sqlite3.Connection, key: str) -> Receipt | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM receipts WHERE receipt_key = ?",  # noqa: S608 - fixed names
        (key,),
    ).fetchone()
    return None if row is None else receipt_of(row)


# Every receipt, in key order, as ``receipt_of`` reads them (an export's).
ALL_RECEIPTS = f"SELECT {_COLUMNS} FROM receipts ORDER BY receipt_key"  # noqa: S608


def receipt_of(row: ReceiptRow) -> Receipt:
    """The receipt a row holds."""
    key, tenant, label, created, expires, max_reads, reads, first, last, ended, state, wrong = row
    return Receipt(
        receipt_key=key,
        tenant=tenant,
        label=label,
        created_at=dt.datetime.fromtimestamp(created, dt.UTC),
        expires_at=None if expires is None else dt.datetime.fromtimestamp(expires, dt.UTC),
        max_reads=max_reads,
        reads=reads,
        first_read_at=_moment(first),
        last_read_at=_moment(last),
        ended_at=_moment(ended),
        state=state,
        passphrase_failures=wrong,
    )


def purge_receipts(conn: sqlite3.Connection, now: dt.datetime, retention_seconds: float) -> int:
    """Remove the receipts whose retention has run out: ended that long ago, or still
    active but expired that long ago (the purge of the secret never ended them)."""
    cutoff = now.timestamp() - retention_seconds
    cursor = conn.execute(
        "DELETE FROM receipts WHERE ended_at <= ?"
        " OR (ended_at IS NULL AND expires_at IS NOT NULL AND expires_at <= ?)",
        (cutoff, cutoff),
    )
    return cursor.rowcount
