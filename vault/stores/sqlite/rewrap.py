"""Key rotation's work on the file: paging through what a rewrap pass takes, swapping a
record's sealing in place, and converting a record stored under its id to its record key.

Each function runs on one pooled connection in the store's thread (``SQLiteStore._run``).
"""

from __future__ import annotations

import sqlite3

from vault.records import SealedSecret
from vault.stores.base import Remaining
from vault.stores.sqlite.documents import KEYED_BY_ID, RECORD_COLUMNS, RecordRow, record_of

# What a pass takes: sealed by another key than the active one, or still keyed by its id.
_TO_REWRAP = f"(key_id <> ? OR {KEYED_BY_ID})"


def records_to_rewrap(
    conn: sqlite3.Connection, key_id: str, after: str, limit: int
) -> list[SealedSecret]:
    rows: list[RecordRow] = conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM secrets"  # noqa: S608 - fixed names only
        f" WHERE {_TO_REWRAP} AND record_key > ? ORDER BY record_key LIMIT ?",
        (key_id, after, limit),
    ).fetchall()
    return [record_of(row) for row in rows]


def replace_sealed(conn: sqlite3.Connection, old: SealedSecret, new: SealedSecret) -> bool:
    # One statement in autocommit mode: atomic, and durable (synchronous=FULL).
    cursor = conn.execute(
        "UPDATE secrets SET key_id = ?, nonce = ?, ciphertext = ?"
        " WHERE record_key = ? AND key_id = ? AND nonce = ?",
        (new.key_id, new.nonce, new.ciphertext, old.record_key, old.key_id, old.nonce),
    )
    return cursor.rowcount == 1


def convert_sealed(conn: sqlite3.Connection, old: SealedSecret, new: SealedSecret) -> bool:
    """Move legacy row ``old`` to ``new``'s record key and sealing in one transaction, its
    lifecycle as it is now; False, nothing written, if it changed or went meanwhile. Under
    ``secure_delete`` the id's bytes are zeroed where the row was."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        current = conn.execute(
            "SELECT key_id, nonce, reads_left FROM secrets WHERE record_key = ?",
            (old.record_key,),
        ).fetchone()
        if current is None or (current[0], bytes(current[1])) != (old.key_id, old.nonce):
            return False
        if conn.execute("SELECT 1 FROM secrets WHERE record_key = ?", (new.record_key,)).fetchone():
            # Stored under its record key already (imported so): that record wins. It keeps
            # the fewer reads of the two: a read taken from either is never given back.
            conn.execute("DELETE FROM secrets WHERE record_key = ?", (old.record_key,))
            conn.execute(
                "UPDATE secrets SET reads_left = ? WHERE record_key = ? AND reads_left > ?",
                (current[2], new.record_key, current[2]),
            )
            return True
        conn.execute(
            "UPDATE secrets SET record_key = ?, key_id = ?, nonce = ?, ciphertext = ?"
            " WHERE record_key = ?",
            (new.record_key, new.key_id, new.nonce, new.ciphertext, old.record_key),
        )
        return True


def count_to_rewrap(conn: sqlite3.Connection, key_id: str) -> Remaining:
    row = conn.execute(
        f"SELECT count(*), coalesce(sum(key_id <> ?), 0), coalesce(sum({KEYED_BY_ID}), 0)"  # noqa: S608
        f" FROM secrets WHERE {_TO_REWRAP}",
        (key_id, key_id),
    ).fetchone()
    return Remaining(int(row[0]), int(row[1]), int(row[2]))
