"""The database file: its schema and migrations, its connections and its WAL."""

from __future__ import annotations

import os
import sqlite3
from contextlib import suppress
from pathlib import Path

SCHEMA = """
-- record_key: the digest of the secret id (vault/records.py), never the id itself; a
-- legacy row, written before, holds its id there until `secret-manager rewrap` converts it.
CREATE TABLE IF NOT EXISTS secrets (
    record_key TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    expires_at INTEGER,  -- Unix seconds; NULL: never expires
    reads_left INTEGER,  -- NULL: no read limit
    tenant     TEXT,     -- NULL: the default tenant
    owner      TEXT,     -- the key that made it, for a secret made for named readers
    readers    TEXT,     -- JSON array of key names; NULL: every key of its tenant
    receipt_id TEXT,     -- the receipt's id, for a secret made with one
    label      TEXT,     -- the creator's label, not secret
    kdf        TEXT,     -- under a passphrase: how its key is derived; NULL: no passphrase
    passphrase_failures INTEGER  -- under a passphrase: the wrong ones tried so far
) WITHOUT ROWID;
-- Idempotent creates (Idempotency-Key): the key's digest, the request body's digest and
-- the answer sealed under the master key (it names the secret id), until expires_at.
CREATE TABLE IF NOT EXISTS idempotency (
    idempotency_key TEXT PRIMARY KEY,
    body_digest     TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    nonce           BLOB NOT NULL,
    ciphertext      BLOB NOT NULL,
    record_key      TEXT NOT NULL,
    created_at      REAL NOT NULL,
    expires_at      REAL NOT NULL,
    state           TEXT NOT NULL
) WITHOUT ROWID;
-- What became of a secret made with a receipt; outlives it until the retention ends.
-- receipt_key: the digest of the receipt id (vault/records.py receipt_key). Times: Unix
-- seconds, fractional for the reads and the end.
CREATE TABLE IF NOT EXISTS receipts (
    receipt_key   TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    label         TEXT,
    created_at    REAL NOT NULL,
    expires_at    INTEGER,
    max_reads     INTEGER,
    reads         INTEGER NOT NULL DEFAULT 0,
    first_read_at REAL,
    last_read_at  REAL,
    ended_at      REAL,
    state         TEXT NOT NULL,
    passphrase_failures INTEGER  -- NULL: the secret has no passphrase
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
    record_id      TEXT,
    tenant         TEXT
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
-- Lifecycle events waiting for their webhook deliveries (vault/events.py, vault/webhooks.py),
-- written in the transaction of the change each reports; never a secret nor a secret id.
-- Times are sqlite_timestamp text. While a deliverer holds a row's lease, next_attempt_at
-- is the lease's end: a row is due, to whoever claims it first, when that time has passed.
CREATE TABLE IF NOT EXISTS outbox (
    event_id        TEXT PRIMARY KEY,
    type            TEXT NOT NULL,
    at              TEXT NOT NULL,
    payload         TEXT NOT NULL,  -- the JSON body every delivery sends and signs, exactly
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    lease_owner     TEXT,
    lease_until     TEXT,
    delivered       TEXT,           -- JSON array of the receivers (digests) that have it
    created_at      TEXT NOT NULL
) WITHOUT ROWID;
"""


# The WAL is cut back to this size whenever a checkpoint resets it, so the space a burst of
# writes took is given back instead of held by a WAL file that only ever grows.
JOURNAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024


def checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database file and truncate it to zero bytes, giving its space
    back to the file system; best effort (it cannot run while another connection writes)."""
    with suppress(sqlite3.Error):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a file written by an earlier version up to the current schema, in one
    transaction: workers opening the file at once see it before or after, never half."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        _migrate(conn)


def _migrate(conn: sqlite3.Connection) -> None:
    secret_columns = {row[1] for row in conn.execute("PRAGMA table_info(secrets)")}
    if "secret_id" in secret_columns:  # the column's rows are record keys now, ids until rewrap
        conn.execute("ALTER TABLE secrets RENAME COLUMN secret_id TO record_key")
    for column, kind in (
        ("expires_at", "INTEGER"),
        ("reads_left", "INTEGER"),
        ("tenant", "TEXT"),
        ("owner", "TEXT"),
        ("readers", "TEXT"),
        ("receipt_id", "TEXT"),
        ("label", "TEXT"),
        ("kdf", "TEXT"),
        ("passphrase_failures", "INTEGER"),
    ):
        if column not in secret_columns:
            conn.execute(f"ALTER TABLE secrets ADD COLUMN {column} {kind}")
    conn.execute("CREATE INDEX IF NOT EXISTS secrets_expires_at ON secrets (expires_at)")
    receipt_columns = {row[1] for row in conn.execute("PRAGMA table_info(receipts)")}
    if "passphrase_failures" not in receipt_columns:
        conn.execute("ALTER TABLE receipts ADD COLUMN passphrase_failures INTEGER")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(audit)")}
    if "api_key_name" not in columns:
        conn.execute("ALTER TABLE audit ADD COLUMN api_key_name TEXT")
    if "record_id" not in columns:
        conn.execute("ALTER TABLE audit ADD COLUMN record_id TEXT")  # NULL in older rows
    if "tenant" not in columns:
        conn.execute("ALTER TABLE audit ADD COLUMN tenant TEXT")  # NULL in older rows
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS audit_record_id ON audit (record_id)")
    # The outbox (a table of its own, made by SCHEMA in a file of any age): what is due, in
    # order, and the oldest row, each one index seek.
    conn.execute("CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at)")
    conn.execute("CREATE INDEX IF NOT EXISTS outbox_created_at ON outbox (created_at)")


def connect(path: Path, timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # A deleted secret's row (delete, last read, purge) is overwritten with zeros in the
    # database file instead of lingering in a free page until it is reused.
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
    return conn


def create_file(path: Path) -> None:
    """The database file, readable by this user only, unless it exists already."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        # Not opened and closed here: closing any descriptor of the file drops every POSIX
        # lock this process holds on it, those of its open SQLite connections included. Then
        # another process may take the file for unused and delete its WAL and shared memory
        # under them (their reads go stale, then fail with "disk I/O error").
        return
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
