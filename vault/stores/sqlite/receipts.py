"""Receipts as rows: written in the transaction of the change they record."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Sequence

from vault.lifecycle import ReceiptChange
from vault.records import Receipt, ReceiptState

_COLUMNS = (
    "receipt_key, tenant, label, created_at, expires_at, max_reads, reads, first_read_at,"
    " last_read_at, ended_at, state"
)


def _seconds(moment: dt.datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _moment(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.UTC)


def insert_receipts(conn: sqlite3.Connection, receipts: Sequence[Receipt]) -> None:
    """Store new receipts in the open transaction."""
    conn.executemany(
        f"INSERT INTO receipts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
        [
            (
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
            )
            for r in receipts
        ],
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
    if row is None:
        return None
    key, tenant, label, created, expires, max_reads, reads, first, last, ended, state = row
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
