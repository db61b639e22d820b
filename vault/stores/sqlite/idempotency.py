"""Idempotent creates' records as rows: stored in the transaction of their secret."""

from __future__ import annotations

import datetime as dt
import sqlite3

from vault.records import IdempotentCreate, SealedSecret

_COLUMNS = (
    "idempotency_key, body_digest, key_id, nonce, ciphertext, record_key, created_at,"
    " expires_at, state"
)


def get(conn: sqlite3.Connection, key: str) -> IdempotentCreate | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM idempotency WHERE idempotency_key = ?",  # noqa: S608
        (key,),
    ).fetchone()
    if row is None:
        return None
    key, digest, key_id, nonce, ciphertext, record_key, created, expires, state = row
    return IdempotentCreate(
        key=key,
        body_digest=digest,
        answer=SealedSecret(key, key_id, bytes(nonce), bytes(ciphertext)),
        record_key=record_key,
        created_at=dt.datetime.fromtimestamp(created, dt.UTC),
        expires_at=dt.datetime.fromtimestamp(expires, dt.UTC),
        state=state,
    )


def claim(
    conn: sqlite3.Connection, create: IdempotentCreate, now: dt.datetime
) -> IdempotentCreate | None:
    """Store ``create`` in the open transaction, or, when its key is stored and still in
    its window, return that one instead (one past its window is replaced)."""
    existing = get(conn, create.key)
    if existing is not None and existing.expires_at > now:
        return existing
    answer = create.answer
    conn.execute(
        f"INSERT OR REPLACE INTO idempotency ({_COLUMNS})"  # noqa: S608 - fixed names
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            create.key,
            create.body_digest,
            answer.key_id,
            answer.nonce,
            answer.ciphertext,
            create.record_key,
            create.created_at.timestamp(),
            create.expires_at.timestamp(),
            "done",
        ),
    )
    return None


def purge(conn: sqlite3.Connection, now: dt.datetime) -> int:
    return conn.execute(
        "DELETE FROM idempotency WHERE expires_at <= ?", (now.timestamp(),)
    ).rowcount
