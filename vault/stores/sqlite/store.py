"""The serving store: secrets, their audit records and the readiness probe in one file."""

from __future__ import annotations

import datetime as dt
import logging
import queue
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from observability.audit import AuditRecord
from vault.errors import CorruptRecord, NotReady, StoreUnavailable
from vault.events import CREATED, EXPIRED, Actor, Event, PendingEvent
from vault.lifecycle import ANYONE, Caller, Opener, Passphrase
from vault.records import (
    IdempotentCreate,
    Receipt,
    SealedSecret,
    keyed_by_id,
    receipt_key,
    record_key,
)
from vault.stores.base import (
    AuditWrite,
    DeleteResult,
    FetchItem,
    FetchResult,
    IdempotentRepeat,
    OutboxSettling,
    Remaining,
    Settlement,
    count_wrong_passphrases,
    delete_changes,
    delete_events,
    fetch_events,
    fetch_results,
    insert_results,
    judge_delete,
    judge_each,
    lookup_keys,
    receipt_changes,
    record_event,
    run_off_loop,
    stamped_audits,
    stored_or_refused,
    unavailable,
    utc_now,
    wrong_passphrases,
)
from vault.stores.batching import Batcher
from vault.stores.health import DISK_FULL, UNREACHABLE, WriteHealth, stored_any
from vault.stores.sqlite import idempotency, receipts, rewrap
from vault.stores.sqlite.connection import (
    SCHEMA,
    checkpoint,
    connect,
    create_file,
    migrate,
)
from vault.stores.sqlite.documents import (
    COUNT_LIVE_BY_KEY_ID,
    INSERT_AUDIT,
    INSERT_RECORD,
    MALFORMED_AUDIT,
    NEXT_KEY_ID,
    RECORD_COLUMNS,
    AuditRow,
    RecordRow,
    audit_row,
    claim_events,
    count_wrong_passphrase,
    guard_of,
    insert_audits,
    insert_each,
    insert_events,
    outbox_backlog,
    record_of,
    record_or_none,
    record_row,
    settle_events,
    sqlite_timestamp,
    take_read,
)
from vault.stores.sqlite.errors import mapped_unavailable, readiness_reason
from vault.stores.threads import StoreThreads

T = TypeVar("T")
log = logging.getLogger("secret_manager.store")


# A create's batch item: its record, and the audit record to write once it is stored.
# A create's batch item: its record and its created event (None: none wanted), and the
# audit record to write once it is stored.
_Insert = tuple[tuple[SealedSecret, Event | None, IdempotentCreate | None], AuditRecord | None]


# A fetch's batch item: the secret id (looked up, never written), what opens the record,
# and the audit record to write.
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


class SQLiteStore(OutboxSettling):
    """Secrets in the ``secrets`` table of one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        timeout: float,
        max_secret_bytes: int,
        connections: int = 4,
        events: Collection[str] = (),
    ) -> None:
        self._path = path
        # The lifecycle events this store writes to its outbox (none: webhooks are off).
        self._events = frozenset(events)
        self._timeout = timeout
        self._size = connections
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._threads: StoreThreads | None = None
        self.health = WriteHealth()  # what /readyz reports: do writes work?
        # What the probe writes while writes fail: at least the pages the largest create does.
        self._probe_room = max_secret_bytes + _CREATE_PAGES_BESIDE_RECORD * _PAGE_BYTES
        # Concurrent creates share one transaction, concurrent fetches one query.
        self._inserts = Batcher(self._insert_batch, operation="insert", timeout=timeout + 1.0)
        self._reads = Batcher(self._fetch_batch, operation="read", timeout=timeout + 1.0)
        self._audits = Batcher(
            self._insert_audit_batch, operation="insert_audit", timeout=timeout + 1.0
        )
        # The deliverers' outcomes (delivered, failed, dropped) share one transaction too.
        self._settles = Batcher(
            self._settle_batch, operation="outbox_settle", timeout=timeout + 1.0
        )

    def _connect(self) -> sqlite3.Connection:
        return connect(self._path, self._timeout)

    def _open_sync(self) -> None:
        create_file(self._path)
        first = self._connect()
        first.executescript(SCHEMA)
        migrate(first)
        self._pool.put(first)
        for _ in range(self._size - 1):
            self._pool.put(self._connect())

    async def open(self) -> None:
        self._threads = StoreThreads(self._size, "sqlite")
        await self._threads.submit(self._open_sync)

    async def close(self) -> None:
        await self._inserts.close()
        await self._reads.close()
        await self._audits.close()
        await self._settles.close()
        if self._threads is not None:
            self._threads.shutdown(wait=True)
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
        threads = self._threads
        if threads is None:
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
                        checkpoint(conn)
                    raise

        async def run() -> T:
            try:
                return await run_off_loop(
                    call,
                    threads=threads,
                    timeout=self._timeout + 1.0 if timeout is None else timeout,
                    operation=operation,
                    system="sqlite",
                )
            except sqlite3.OperationalError as exc:
                raise mapped_unavailable(exc) from None

        if write:
            return await self.health.track(run(), readiness_reason, proves=proves)
        return await run()

    @staticmethod
    def _insert_rows(
        conn: sqlite3.Connection, items: list[_Insert], rows: list[RecordRow], now: dt.datetime
    ) -> list[Exception | None]:
        """Insert the batch's records in the open transaction; one entry per item: None, or
        the error that item alone met. An idempotent create's record goes in with its key's
        (a savepoint makes the two one), unless that key is stored: IdempotentRepeat."""
        results: list[Exception | None] = [None] * len(items)
        plain = [k for k, ((_, _, idem), _) in enumerate(items) if idem is None]
        plain_rows = [rows[k] for k in plain]
        for k, error in zip(plain, insert_each(conn, INSERT_RECORD, plain_rows), strict=True):
            results[k] = error
        for k, ((_, _, idem), _) in enumerate(items):
            if idem is None:
                continue
            conn.execute("SAVEPOINT idempotent")
            existing = idempotency.claim(conn, idem, now)
            if existing is not None:
                results[k] = IdempotentRepeat(existing)
            else:
                try:
                    conn.execute(INSERT_RECORD, rows[k])
                except sqlite3.IntegrityError as exc:
                    conn.execute("ROLLBACK TO idempotent")
                    results[k] = exc
            conn.execute("RELEASE idempotent")
        return results

    async def _insert_batch(self, items: list[_Insert]) -> list[AuditWrite | Exception | None]:
        rows = [record_row(r) for (r, _, _), _ in items]

        now = utc_now()
        # Each item's receipt, for a secret made with one: stored only with its secret.
        item_receipts = [
            None if record.receipt_id is None else Receipt.of(record, now)
            for (record, _, _), _ in items
        ]

        def insert(conn: sqlite3.Connection) -> list[AuditWrite | Exception | None]:
            with conn:  # one transaction, one fsync: the batch, its receipts and audit records
                conn.execute("BEGIN IMMEDIATE")
                results = self._insert_rows(conn, items, rows, now)
                receipts.insert_receipts(
                    conn,
                    [
                        receipt
                        for receipt, error in zip(item_receipts, results, strict=True)
                        if receipt is not None and error is None
                    ],
                )
                created = [
                    event
                    for ((_, event, _), _), error in zip(items, results, strict=True)
                    if event is not None and error is None
                ]
                insert_events(conn, created, now)
                audits = stamped_audits(items, results)
                errors = insert_audits(conn, audits)
            return insert_results(results, audits, errors)  # only now: committed, durable

        return await self._run("insert", insert, write=True, proves=stored_any)

    async def insert(
        self,
        record: SealedSecret,
        audit: AuditRecord | None = None,
        actor: Actor | None = None,
        idempotent: IdempotentCreate | None = None,
    ) -> AuditWrite | None:
        event = None
        if CREATED in self._events:
            event = record_event(CREATED, record, utc_now(), actor)
        written: AuditWrite | None = await self._inserts.submit(
            ((record, event, idempotent), audit)
        )
        return written

    async def purge_idempotency(self) -> int:
        now = utc_now()
        return await self._run(
            "purge_idempotency", lambda conn: idempotency.purge(conn, now), write=True
        )

    def _select(
        self, conn: sqlite3.Connection, secret_ids: list[str]
    ) -> dict[str, SealedSecret | CorruptRecord]:
        """The record of each id, under its record key or else under the id itself (a
        legacy row), in one statement; an id is only compared there, never written."""
        wanted = {secret_id: lookup_keys(secret_id) for secret_id in secret_ids}  # each once
        keys = [key for pair in wanted.values() for key in pair]
        placeholders = ", ".join("?" * len(keys))  # twice MAX_BATCH at most, under SQLite's cap
        rows: list[RecordRow] = conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM secrets"  # noqa: S608 - fixed names and "?"s
            f" WHERE record_key IN ({placeholders})",
            keys,
        ).fetchall()
        by_key = {row[0]: row for row in rows}
        found: dict[str, SealedSecret | CorruptRecord] = {}
        for secret_id, pair in wanted.items():
            row = next((by_key[key] for key in pair if key in by_key), None)  # the digest first
            if row is not None:
                try:
                    found[secret_id] = record_of(row)
                except CorruptRecord as exc:  # fails the requests for this id alone
                    found[secret_id] = exc
        return found

    def _fetch_sync(
        self, conn: sqlite3.Connection, items: list[FetchItem]
    ) -> list[FetchResult | Exception]:
        """A batch of fetches in one call: one answer per item."""
        secret_ids = [item.secret_id for item in items]
        now = utc_now()
        found = self._select(conn, secret_ids)
        records: list[SealedSecret | CorruptRecord | None] = [found.get(i) for i in secret_ids]
        limited = [
            (k, r)
            for k, r in enumerate(records)
            if isinstance(r, SealedSecret) and items[k].takes_a_read(r, now)
        ]
        if not limited:
            results, audits = judge_each(items, records, now)
            wrong = wrong_passphrases(results)
            changes = receipt_changes(results, now)
            made = fetch_events(items, records, results, now, self._events)
            if not wrong and not changes and not made and all(a is None for a in audits):
                return fetch_results(results, audits, {})  # a pure read: no transaction
        with conn:  # one transaction, one fsync: reads taken, receipts, events, audit records
            conn.execute("BEGIN IMMEDIATE")
            for k, record in limited:  # each its own atomic take
                row = take_read(conn, record.record_key, lookup_keys(secret_ids[k]))
                records[k] = None if row is None else record_of(row)
            if limited:  # judged only now, on the records as the takes left them
                results, audits = judge_each(items, records, now)
            if limited or wrong_passphrases(results):
                count_wrong_passphrases(
                    items,
                    results,
                    audits,
                    lambda record, limit: count_wrong_passphrase(
                        conn, record.record_key, (record.record_key,), limit
                    ),
                )
                changes = receipt_changes(results, now)
                made = fetch_events(items, records, results, now, self._events)
            receipts.apply_changes(conn, changes)
            insert_events(conn, made, now)
            errors = insert_audits(
                conn, {k: audit for k, audit in enumerate(audits) if audit is not None}
            )
        return fetch_results(results, audits, errors)  # committed, durable

    async def _fetch_batch(self, items: list[FetchItem]) -> list[FetchResult | Exception]:
        answers: list[FetchResult | Exception] = await self.health.track_writes(
            self._run("read", lambda conn: self._fetch_sync(conn, items)),
            readiness_reason,
            writes=any(item.audit is not None for item in items) or bool(self._events),
        )
        return answers

    async def fetch(
        self,
        secret_id: str,
        opener: Opener,
        audit: AuditRecord | None = None,
        caller: Caller = ANYONE,
        actor: Actor | None = None,
        passphrase: Passphrase | None = None,
    ) -> FetchResult:
        result: FetchResult = await self._reads.submit(
            FetchItem(secret_id, opener, audit, caller, actor, passphrase)
        )
        return result

    async def delete(
        self, secret_id: str, caller: Caller = ANYONE, actor: Actor | None = None
    ) -> DeleteResult:
        keys = lookup_keys(secret_id)

        def remove(conn: sqlite3.Connection) -> DeleteResult:
            # Judged and removed in one transaction; under either key, as a legacy row left
            # beside its converted one would bring the secret back. The digest's row
            # answers when both are there.
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                rows: list[tuple[Any, ...]] = conn.execute(
                    "SELECT record_key, expires_at, reads_left, tenant, owner, readers,"
                    " receipt_id, label FROM secrets WHERE record_key IN (?, ?)",
                    keys,
                ).fetchall()
                by_key = {row[0]: row for row in rows}
                row = next((by_key[key] for key in keys if key in by_key), None)
                if row is None:
                    return DeleteResult.MISSING
                _, expires_at, reads_left, tenant, owner, readers, receipt_id, label = row
                expiry = (
                    None if expires_at is None else dt.datetime.fromtimestamp(expires_at, dt.UTC)
                )
                now = utc_now()
                guard = guard_of((tenant, owner, readers))
                result = judge_delete((guard, expiry, reads_left), caller, now)
                if result in (DeleteResult.DELETED, DeleteResult.EXPIRED):
                    conn.execute("DELETE FROM secrets WHERE record_key IN (?, ?)", keys)
                    changes = delete_changes(receipt_id, expiry, result, now)
                    receipts.apply_changes(conn, changes)
                made = delete_events(
                    result,
                    now,
                    actor,
                    self._events,
                    tenant=guard.tenant,
                    receipt_id=receipt_id,
                    label=label,
                    reads_left=reads_left,
                    expires_at=expiry,
                )
                insert_events(conn, made, now)
                return result

        result: DeleteResult = await self._run("delete", remove, write=True)
        return result

    async def purge_receipts(self, retention_seconds: float) -> int:
        now = utc_now()
        return await self._run(
            "purge_receipts",
            lambda conn: receipts.purge_receipts(conn, now, retention_seconds),
            write=True,
        )

    async def receipt(self, receipt_id: str) -> Receipt | None:
        key = receipt_key(receipt_id)
        return await self._run("receipt", lambda conn: receipts.get_receipt(conn, key))

    async def purge_expired(self) -> int:
        moment = utc_now()
        now = int(moment.timestamp())

        def purge(conn: sqlite3.Connection) -> int:
            if EXPIRED not in self._events:
                cursor = conn.execute(
                    "DELETE FROM secrets WHERE expires_at <= ? OR reads_left = 0", (now,)
                )
                removed = cursor.rowcount
            else:  # each expiry's event in the transaction that removes the secret
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    rows = conn.execute(
                        f"DELETE FROM secrets WHERE expires_at <= ? OR reads_left = 0"  # noqa: S608
                        f" RETURNING {RECORD_COLUMNS}",
                        (now,),
                    ).fetchall()
                    expired = [
                        record_event(EXPIRED, r, r.expires_at or moment, None)
                        for r in map(record_or_none, rows)
                        if r is not None and r.reads_left != 0
                    ]
                    insert_events(conn, expired, moment)
                removed = len(rows)
            checkpoint(conn)  # periodically, so the WAL gives its space back between bursts
            return removed

        return await self._run("purge_expired", purge, write=True)

    async def prepare_rewrap(self) -> None:
        """Nothing to do: the schema already indexes ``key_id``."""

    async def finish_rewrap(self) -> None:
        await self._run("rewrap_checkpoint", checkpoint, write=True)

    async def records_to_rewrap(self, key_id: str, after: str, limit: int) -> list[SealedSecret]:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._run(
            "rewrap_find", lambda conn: rewrap.records_to_rewrap(conn, key_id, after, limit)
        )

    async def replace_sealed(self, old: SealedSecret, new: SealedSecret) -> bool:
        if new.record_key != old.record_key:
            raise ValueError("a record can only be replaced by a record with its own key")
        return await self._run(
            "rewrap_replace", lambda conn: rewrap.replace_sealed(conn, old, new), write=True
        )

    async def convert_sealed(self, old: SealedSecret, new: SealedSecret) -> bool:
        if not keyed_by_id(old.record_key) or new.record_key != record_key(old.record_key):
            raise ValueError("only a record keyed by its id converts, to its own record key")
        return await self._run(
            "rewrap_convert", lambda conn: rewrap.convert_sealed(conn, old, new), write=True
        )

    async def count_to_rewrap(self, key_id: str) -> Remaining:
        return await self._run("rewrap_count", lambda conn: rewrap.count_to_rewrap(conn, key_id))

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

    async def add_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        now = utc_now()

        def add(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                insert_events(conn, events, now)

        await self._run("outbox_add", add, write=True)

    async def claim_events(
        self, owner: str, now: dt.datetime, lease_seconds: float, limit: int
    ) -> list[PendingEvent]:
        if limit < 1:
            return []
        claimed, malformed = await self._run(
            "outbox_claim",
            lambda conn: claim_events(conn, owner, now, lease_seconds, limit),
            write=True,
        )
        for event_id in malformed:  # edited in the file: it could never be delivered
            log.warning("outbox event %s is malformed and was removed undelivered", event_id)
        return claimed

    async def _settle_batch(self, items: list[Settlement]) -> list[bool]:
        return await self._run("outbox_settle", lambda conn: settle_events(conn, items), write=True)

    async def outbox_backlog(self, now: dt.datetime) -> tuple[int, dt.datetime | None]:
        return await self._run("outbox_backlog", outbox_backlog)

    async def _insert_audit_batch(self, rows: list[AuditRow]) -> list[Exception | None]:
        def insert(conn: sqlite3.Connection) -> list[Exception | None]:
            with conn:  # one transaction, one fsync, for the whole batch
                conn.execute("BEGIN IMMEDIATE")
                return insert_each(conn, INSERT_AUDIT, rows)

        try:
            return await self._run("insert_audit", insert, write=True)
        except Exception as exc:  # the whole call failed: every record in it may be retried
            raise unavailable(exc) from exc

    async def insert_audit(self, record: AuditRecord) -> Exception | None:
        try:
            row = audit_row(record.as_document())
        except MALFORMED_AUDIT as exc:  # refused alone
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
                checkpoint(conn)  # give back what the WAL holds before trying again
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
