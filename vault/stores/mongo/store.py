"""The serving store: secrets, their audit records and the readiness probe in MONGO_DB."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Collection as Many
from typing import Any

import pymongo
from pymongo import DeleteOne, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import PyMongoError
from pymongo.write_concern import WriteConcern

from observability.audit import AuditRecord
from vault.errors import CorruptRecord, NotReady, StoreUnavailable
from vault.events import (
    CREATED,
    EXPIRED,
    Actor,
    Event,
    PendingEvent,
    derived_event_id,
    secret_event,
)
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
    stamped_audits,
    stored_or_refused,
    unavailable,
    utc_now,
)
from vault.stores.batching import Batcher
from vault.stores.health import UNREACHABLE, WriteHealth, stored_any
from vault.stores.mongo import idempotency, receipts, rewrap
from vault.stores.mongo.connection import (
    MongoConnection,
    log,
)
from vault.stores.mongo.creates import (
    CreateWrites,
    Namespaces,
    supports_bulk_write,
    write_creates,
)
from vault.stores.mongo.documents import (
    MALFORMED_AUDIT,
    MALFORMED_EVENT,
    audit_document,
    aware,
    document,
    event_document,
    found_for_delete,
    insert_each,
    insert_events,
    pending_of,
    sealed_or_corrupt,
)
from vault.stores.mongo.errors import (
    is_unavailable,
    readiness_reason,
)

_TTL_INDEX = "ts_ttl"
_EXPIRY_INDEX = "expires_at_ttl"
_KID_INDEX = "kid"
PING_TIMEOUT_SECONDS = 2.0
# After the server refused bulkWrite, how long create batches take two commands before
# one is tried again (setting the featureCompatibilityVersion to 8.0 needs no restart).
BULK_WRITE_RECHECK_SECONDS = 300


# Building the key id index reads the whole collection: it gets far more than a request's budget.
INDEX_BUILD_TIMEOUT_SECONDS = 600.0


# What a create writes beside its record's bytes (its audit record, index entries), at most.
_CREATE_BYTES_BESIDE_RECORD = 4096


# A create's batch item: its document, and the audit record to write once it is stored.
# A create's batch item: its document, its receipt's and its created event (None without
# either), and its audit record.
_Insert = tuple[
    tuple[dict[str, Any], dict[str, Any] | None, Event | None, IdempotentCreate | None],
    AuditRecord | None,
]


# A fetch's batch item: the secret id (looked up, never written), what opens the record,
# and the audit record to write.


class MongoStore(OutboxSettling):
    """Secrets in the ``secrets`` collection of MONGO_DB, keyed by record key (the digest of
    the secret id; the id itself for a legacy record, until rewrap converts it)."""

    def __init__(
        self,
        uri: str,
        database: str,
        *,
        write_concern: str | int = "majority",
        journal: bool = True,
        pool_size: int = 32,
        timeout: float,
        max_secret_bytes: int,
        events: Many[str] = (),
    ) -> None:
        self._mongo = MongoConnection(uri, pool_size=pool_size, timeout=timeout)
        # The lifecycle events this store writes to its outbox (none: webhooks are off).
        self._events = frozenset(events)
        durable = WriteConcern(w=write_concern, j=journal)
        db = self._mongo.client[database]
        self._secrets: Collection[dict[str, Any]] = db.get_collection(
            "secrets", write_concern=durable
        )
        self._audit: Collection[dict[str, Any]] = db.get_collection("audit", write_concern=durable)
        self._receipts: Collection[dict[str, Any]] = db.get_collection(
            "receipts", write_concern=durable
        )
        self._idempotency: Collection[dict[str, Any]] = db.get_collection(
            "idempotency", write_concern=durable
        )
        # Lifecycle events waiting for their webhook deliveries (documents.py says how).
        self._outbox: Collection[dict[str, Any]] = db.get_collection(
            "outbox", write_concern=durable
        )
        # The documents the readiness probe rewrites to learn whether writes work; no secret.
        self._readiness: Collection[dict[str, Any]] = db.get_collection(
            "readiness", write_concern=durable
        )
        # Where a create batch's one command (creates.py) writes each kind of document.
        self._names = Namespaces(
            secrets=self._secrets.full_name,
            idempotency=self._idempotency.full_name,
            receipts=self._receipts.full_name,
            outbox=self._outbox.full_name,
            audit=self._audit.full_name,
        )
        self.health = WriteHealth()  # what /readyz reports: do writes work?
        # What the probe writes while writes fail: at least what the largest create does.
        self._probe_room = max_secret_bytes + _CREATE_BYTES_BESIDE_RECORD
        # Concurrent creates share one insert_many, concurrent fetches one find (group commit).
        deadline = timeout + 1.0  # as for each call: the driver's own timeout ends first
        # While the database is known down they refuse at once rather than queue behind the
        # probe (audit records too: the writer spills them to the log, as for any outage).
        breaker = self._mongo.breaker
        self._inserts = Batcher(
            self._insert_batch, operation="insert", timeout=deadline, breaker=breaker
        )
        self._reads = Batcher(
            self._fetch_batch, operation="read", timeout=deadline, breaker=breaker
        )
        self._audits = Batcher(
            self._insert_audit_batch, operation="insert_audit", timeout=deadline, breaker=breaker
        )
        # The deliverers' outcomes (delivered, failed, dropped): one thread hand-off a batch.
        self._settles = Batcher(
            self._settle_batch, operation="outbox_settle", timeout=deadline, breaker=breaker
        )
        self._outbox_indexes = False  # made by the first claim or backlog count
        # When the server last refused bulkWrite (creates.py): until the recheck, none is sent.
        self._bulk_write_refused_at: float | None = None
        self._expiry_index = False  # the TTL index on expires_at, made by the first purge
        self._kid_index = False  # the index on kid, made by the first key guard check

    async def open(self) -> None:
        await self._mongo.open()

    async def close(self) -> None:
        await self._inserts.close()
        await self._reads.close()
        await self._audits.close()
        await self._settles.close()
        await self._mongo.close()

    def _insert_many_sync(self, items: list[_Insert]) -> list[AuditWrite | Exception | None]:
        """Insert a batch, then the audit records of the records stored, in one budget; one
        answer per item: its record's own error, or its audit record's write. One command
        where every server is MongoDB 8.0 or later (creates.py), else two or more in turn."""
        with pymongo.timeout(self._mongo.timeout):
            if self._bulk_write_usable():
                written = self._insert_one_command_sync(items)
                if written is not None:
                    return written
                self._bulk_write_refused_at = time.monotonic()
                log.warning(
                    "MongoDB refused the bulkWrite command: creates take two commands each for "
                    "the next %d s; a MongoDB 8.0 whose featureCompatibilityVersion is below "
                    "8.0 does this (docs/operations.md)",
                    BULK_WRITE_RECHECK_SECONDS,
                )
            results = self._insert_docs_sync(items)
            stored = [parts for (parts, _), e in zip(items, results, strict=True) if e is None]
            receipts.insert_receipts(self._receipts, [r for _, r, _, _ in stored if r is not None])
            insert_events(self._outbox, [e for _, _, e, _ in stored if e is not None])
            audits = stamped_audits(items, results)
            errors = self._write_audits_sync(audits)
        return insert_results(results, audits, errors)

    def _bulk_write_usable(self) -> bool:
        """Whether a create batch may be one bulkWrite: every server speaks 8.0's wire
        version, and none refused the command in the last BULK_WRITE_RECHECK_SECONDS."""
        refused_at = self._bulk_write_refused_at
        if refused_at is not None and time.monotonic() - refused_at < BULK_WRITE_RECHECK_SECONDS:
            return False
        return supports_bulk_write(self._mongo.client)

    def _insert_one_command_sync(
        self, items: list[_Insert]
    ) -> list[AuditWrite | Exception | None] | None:
        """``_insert_many_sync`` in one client-level bulkWrite (None: the server refused the
        command, and nothing was written). The audit records are
        stamped before it is sent (the answer, 200, is decided unless a secret is refused,
        whose record is then never written)."""
        now = utc_now()
        audits = {k: audit.answered(200) for k, (_, audit) in enumerate(items) if audit}
        malformed: dict[int, Exception] = {}
        audit_docs: dict[int, dict[str, Any]] = {}
        for k, audit in audits.items():
            try:
                audit_docs[k] = audit_document(audit.as_document())
            except MALFORMED_AUDIT as exc:  # refused alone
                malformed[k] = exc
        writes = [
            CreateWrites(
                secret=doc,
                receipt=receipt,
                event=None if event is None else event_document(event, now),
                audit=audit_docs.get(k),
                idempotent=idem,
            )
            for k, ((doc, receipt, event, idem), _) in enumerate(items)
        ]
        written = write_creates(
            self._mongo.client,
            self._names,
            writes,
            write_concern=self._secrets.write_concern,
            claim_again=lambda idem: idempotency.claim(
                self._idempotency, self._secrets, idem, now, self._mongo.timeout * 2 + 5
            ),
            secret_stored=lambda doc: doc["_id"] in self._already_stored([doc]),
            audit_stored=lambda doc: doc["_id"] in self._audits_stored([doc]),
        )
        if written is None:
            return None
        results, refused = written
        stored = {k: audit for k, audit in audits.items() if results[k] is None}
        return insert_results(results, stored, {**malformed, **refused})

    def _insert_docs_sync(self, items: list[_Insert]) -> list[Exception | None]:
        """Insert the batch's documents; one entry per item: None, or its own error. An
        idempotent create's key is claimed first, and its secret written only then (else
        IdempotentRepeat); the key is marked done, or removed, once the insert answered."""
        now = utc_now()
        results: list[Exception | None] = [None] * len(items)
        for k, ((_, _, _, idem), _) in enumerate(items):
            if idem is not None:
                existing = idempotency.claim(
                    self._idempotency, self._secrets, idem, now, self._mongo.timeout * 2 + 5
                )
                if existing is not None:
                    results[k] = IdempotentRepeat(existing)
        todo = [k for k in range(len(items)) if results[k] is None]
        docs = [items[k][0][0] for k in todo]
        inserted = insert_each(self._secrets, docs, self._already_stored) if docs else []
        for k, error in zip(todo, inserted, strict=True):
            results[k] = error
        claimed = [(k, idem) for k in todo if (idem := items[k][0][3]) is not None]
        idempotency.finish(
            self._idempotency,
            stored=[idem.key for k, idem in claimed if results[k] is None],
            failed=[idem.key for k, idem in claimed if results[k] is not None],
        )
        return results

    def _write_audits_sync(self, audits: Mapping[int, AuditRecord]) -> dict[int, Exception | None]:
        """Write the audit records riding with a batch (after its own records): each one's
        error (None: written), by its item's index. Raises only when the database did not
        take the call (down, timed out): the batch's requests are then answered 503 like
        any outage's."""
        errors: dict[int, Exception | None] = {}
        docs: dict[int, dict[str, Any]] = {}
        for k, audit in audits.items():
            try:
                docs[k] = audit_document(audit.as_document())
            except MALFORMED_AUDIT as exc:  # refused alone
                errors[k] = exc
        if not docs:
            return errors
        try:
            results: list[Exception | None] = self._insert_audit_sync(list(docs.values()))
        except PyMongoError as exc:
            if is_unavailable(exc):
                raise
            results = [exc] * len(docs)
        errors.update(zip(docs, results, strict=True))
        return errors

    def _already_stored(self, docs: list[dict[str, Any]]) -> set[object]:
        # A retried insert whose first attempt landed: the same record is already there,
        # which is success. Anything else under this id is a real conflict.
        wanted = {doc["_id"]: doc for doc in docs}
        return {
            existing["_id"]
            for existing in self._secrets.find({"_id": {"$in": list(wanted)}})
            if all(existing.get(k) == wanted[existing["_id"]][k] for k in ("nonce", "ct"))
        }

    async def _write(
        self,
        operation: str,
        func: Callable[..., Any],
        *args: object,
        proves: bool | Callable[[Any], bool] = False,
    ) -> Any:
        """``self._mongo.run`` for a write: its failure is reported to ``self.health``, and
        so is its success when ``proves`` says it shows writes work (a write as large as a
        create; see vault/stores/health.py)."""
        return await self.health.track(
            self._mongo.run(operation, func, *args), readiness_reason, proves=proves
        )

    async def _insert_batch(self, items: list[_Insert]) -> list[AuditWrite | Exception | None]:
        results: list[AuditWrite | Exception | None] = await self._write(
            "insert", self._insert_many_sync, items, proves=stored_any
        )
        return results

    async def insert(
        self,
        record: SealedSecret,
        audit: AuditRecord | None = None,
        actor: Actor | None = None,
        idempotent: IdempotentCreate | None = None,
    ) -> AuditWrite | None:
        now = dt.datetime.now(dt.UTC)
        receipt = None
        if record.receipt_id is not None:
            receipt = receipts.receipt_document(Receipt.of(record, now))
        event = record_event(CREATED, record, now, actor) if CREATED in self._events else None
        written: AuditWrite | None = await self._inserts.submit(
            ((document(record, now), receipt, event, idempotent), audit)
        )
        return written

    async def purge_idempotency(self) -> int:
        removed: int = await self._write(
            "purge_idempotency", idempotency.purge, self._idempotency, utc_now()
        )
        return removed

    def _find_keys(self, keys: list[str]) -> dict[str, SealedSecret | CorruptRecord]:
        """The documents stored under ``keys``, by key: each its record, or CorruptRecord
        for a malformed one."""
        if len(keys) == 1:
            doc = self._secrets.find_one({"_id": keys[0]})
            return {} if doc is None else {keys[0]: sealed_or_corrupt(doc)}
        cursor = self._secrets.find({"_id": {"$in": keys}})
        return {str(doc["_id"]): sealed_or_corrupt(doc) for doc in cursor}

    def _find_many_sync(self, secret_ids: list[str]) -> list[SealedSecret | Exception | None]:
        """One entry per id: its record, None when there is none, or CorruptRecord for a
        malformed one, which fails only the requests for that id.

        Looked up under the record keys first; only the ids found under none are looked up
        again, under either key (a legacy record, or one converted in between), so the id
        of a converted secret never reaches the database, whose logs may quote queries."""
        wanted = {secret_id: lookup_keys(secret_id) for secret_id in secret_ids}  # each once
        found = self._find_keys([digest for digest, _ in wanted.values()])
        missing = [key for keys in wanted.values() if keys[0] not in found for key in keys]
        if missing:
            found.update(self._find_keys(missing))
        return [
            next((found[key] for key in wanted[secret_id] if key in found), None)
            for secret_id in secret_ids
        ]

    def _fetch_many_sync(self, items: list[FetchItem]) -> list[FetchResult | Exception]:
        """A batch of fetches in one budget: the records read, the reads taken (each its
        own atomic update), then the audit records; one answer per item."""
        secret_ids = [item.secret_id for item in items]
        now = utc_now()
        with pymongo.timeout(self._mongo.timeout):
            records = self._find_many_sync(secret_ids)
            for k, record in enumerate(records):
                if isinstance(record, SealedSecret) and items[k].takes_a_read(record, now):
                    records[k] = self._take_read_sync(
                        record.record_key, lookup_keys(secret_ids[k]), items[k].passphrase
                    )
            results, audits = judge_each(items, records, now)
            count_wrong_passphrases(items, results, audits, self._count_wrong_passphrase_sync)
            receipts.apply_changes(self._receipts, receipt_changes(results, now))
            insert_events(
                self._outbox, fetch_events(items, records, results, now, self._events), now
            )
            errors = self._write_audits_sync(
                {k: audit for k, audit in enumerate(audits) if audit is not None}
            )
        return fetch_results(results, audits, errors)

    async def _fetch_batch(self, items: list[FetchItem]) -> list[FetchResult | Exception]:
        results: list[FetchResult | Exception] = await self.health.track_writes(
            self._mongo.run("read", self._fetch_many_sync, items),
            readiness_reason,
            writes=any(item.audit is not None for item in items) or bool(self._events),
        )
        return results

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

    def _count_wrong_passphrase_sync(self, record: SealedSecret, limit: int) -> int | None:
        """One wrong passphrase counted by one atomic update, so tries racing on any
        replica each count once and none past ``limit``; the try that reaches it deletes
        the record (and, between the two, no read is taken: ``_take_read_sync``)."""
        doc = self._secrets.find_one_and_update(
            {"_id": record.record_key, "passphrase_failures": {"$lt": limit}},
            {"$inc": {"passphrase_failures": 1}},
            projection={"passphrase_failures": 1},
            return_document=pymongo.ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        failures = int(doc["passphrase_failures"])
        if failures >= limit:
            self._secrets.delete_one({"_id": record.record_key})
        return failures

    def _take_read_sync(
        self, key: str, keys: tuple[str, ...], passphrase: Passphrase | None = None
    ) -> SealedSecret | Exception | None:
        # One atomic document update per read: concurrent readers on any replica each
        # take a different count, and none gets past zero (nor, under a passphrase, past
        # a limit of wrong tries that its deletion has not followed yet).
        wanted: dict[str, Any] = {"_id": key, "reads_left": {"$gt": 0}}
        if passphrase is not None:
            wanted["passphrase_failures"] = {"$lt": passphrase.max_attempts}
        doc = self._secrets.find_one_and_update(
            wanted,
            {"$inc": {"reads_left": -1}},
            return_document=pymongo.ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        if doc.get("reads_left") == 0:
            # The last read: the ciphertext goes before the answer does. Matched on the
            # count, so a record rewritten meanwhile is still removed only when used up;
            # with it goes any other document of the secret's ``keys`` (a legacy one beside
            # its converted one, or one being converted), which would serve it again. The
            # id this may send is worthless from now on.
            self._secrets.delete_many(
                {"_id": {"$in": list(keys)}, "$or": [{"_id": {"$ne": key}}, {"reads_left": 0}]}
            )
        return sealed_or_corrupt(doc)

    def _delete_events(
        self, result: DeleteResult, doc: Mapping[str, Any], now: dt.datetime, actor: Actor | None
    ) -> None:
        """Write the event of a delete's verdict on ``doc`` (what was read of it)."""
        if not self._events:
            return
        guard, expires_at, reads_left = found_for_delete(doc)
        receipt_id, label = doc.get("receipt_id"), doc.get("label")
        made = delete_events(
            result,
            now,
            actor,
            self._events,
            tenant=guard.tenant,
            receipt_id=receipt_id if isinstance(receipt_id, str) else None,
            label=label if isinstance(label, str) else None,
            reads_left=reads_left,
            expires_at=expires_at,
        )
        insert_events(self._outbox, made, now)

    def _delete_sync(self, secret_id: str, caller: Caller, actor: Actor | None) -> DeleteResult:
        keys = lookup_keys(secret_id)
        projection = {
            "_id": 1,
            "expires_at": 1,
            "reads_left": 1,
            "tenant": 1,
            "owner": 1,
            "readers": 1,
            "receipt_id": 1,
            "label": 1,
        }
        with pymongo.timeout(self._mongo.timeout):
            docs = {
                doc["_id"]: doc
                for doc in self._secrets.find({"_id": {"$in": list(keys)}}, projection)
            }
            # The digest's document answers when both are there.
            doc = next((docs[key] for key in keys if key in docs), None)
            if doc is None:
                return DeleteResult.MISSING
            now = utc_now()
            result = judge_delete(found_for_delete(doc), caller, now)
            if result not in (DeleteResult.DELETED, DeleteResult.EXPIRED):
                self._delete_events(result, doc, now, actor)
                return result  # nothing removed
            # Removed by one atomic call, which says whether this delete (of concurrent
            # ones, or a last read) is the one that removed it; then under the other key
            # too: a legacy record, or one left beside its converted one or being
            # converted, which would serve the secret again.
            gone = self._secrets.find_one_and_delete({"_id": doc["_id"]}, projection=projection)
            self._secrets.delete_many({"_id": {"$in": [key for key in keys if key != doc["_id"]]}})
            if gone is None:
                return DeleteResult.MISSING
            _, expires_at, _ = found = found_for_delete(gone)
            result = judge_delete(found, caller, now)
            changes = delete_changes(gone.get("receipt_id"), expires_at, result, now)
            receipts.apply_changes(self._receipts, changes)
            self._delete_events(result, gone, now, actor)
        return result

    async def delete(
        self, secret_id: str, caller: Caller = ANYONE, actor: Actor | None = None
    ) -> DeleteResult:
        result: DeleteResult = await self._write(
            "delete", self._delete_sync, secret_id, caller, actor
        )
        return result

    def _expired_events_sync(self, now: dt.datetime) -> None:
        """Write the expiry event of every secret the purge is about to remove, before it
        removes them. Each event's id derives from its record key, so replicas purging at
        once write one event per expiry (the outbox keeps the first), and a purge cut short
        between the two steps loses none: the next one writes the same ids again."""
        fields = {"expires_at": 1, "reads_left": 1, "tenant": 1, "receipt_id": 1, "label": 1}
        made = []
        for doc in self._secrets.find({"expires_at": {"$lte": now}}, fields):
            guard, expires_at, reads_left = found_for_delete(doc)
            receipt_id, label = doc.get("receipt_id"), doc.get("label")
            event = secret_event(
                EXPIRED,
                expires_at or now,
                tenant=guard.tenant,
                receipt_id=receipt_id if isinstance(receipt_id, str) else None,
                label=label if isinstance(label, str) else None,
                reads_left=reads_left,
                expires_at=expires_at,
                actor=None,
            )
            made.append(dataclasses.replace(event, id=derived_event_id(str(doc["_id"]), EXPIRED)))
        insert_events(self._outbox, made, now)

    def _purge_sync(self, now: dt.datetime) -> int:
        if EXPIRED in self._events:
            # MongoDB's TTL monitor would remove expired documents without their events:
            # with expiry events on, the purge alone removes them (an existing TTL index
            # should be dropped: docs/operations.md).
            self._expired_events_sync(now)
        elif not self._expiry_index:
            # MongoDB's own TTL monitor removes expired documents (about once a minute);
            # the explicit purge below makes removal prompt and countable on any server.
            # Found by its key, as another replica (or nx-27017, which renames indexes)
            # may have made it under another name.
            if not any(
                [field for field, _ in info.get("key", [])] == ["expires_at"]
                and "expireAfterSeconds" in info
                for info in self._secrets.index_information().values()
            ):
                self._secrets.create_index("expires_at", name=_EXPIRY_INDEX, expireAfterSeconds=0)
            self._expiry_index = True
        expired = self._secrets.delete_many({"expires_at": {"$lte": now}}).deleted_count
        used_up = self._secrets.delete_many({"reads_left": 0}).deleted_count
        return expired + used_up

    async def purge_receipts(self, retention_seconds: float) -> int:
        removed: int = await self._write(
            "purge_receipts",
            receipts.purge_receipts,
            self._receipts,
            utc_now(),
            retention_seconds,
        )
        return removed

    def _receipt_sync(self, receipt_id: str) -> Receipt | None:
        doc = self._receipts.find_one({"_id": receipt_key(receipt_id)})
        return None if doc is None else receipts.receipt_of(doc)

    async def receipt(self, receipt_id: str) -> Receipt | None:
        found: Receipt | None = await self._mongo.run("receipt", self._receipt_sync, receipt_id)
        return found

    async def purge_expired(self) -> int:
        removed: int = await self._write("purge_expired", self._purge_sync, utc_now())
        return removed

    def _create_kid_index_sync(self) -> None:
        with pymongo.timeout(INDEX_BUILD_TIMEOUT_SECONDS):
            self._secrets.create_index("kid", name=_KID_INDEX)

    async def prepare_rewrap(self) -> None:
        """An index on ``kid`` unless one exists (under any name), built by the rewrap
        command or the key guard rather than at every start."""
        await self._mongo.run(
            "rewrap_index", self._ensure_kid_index_sync, timeout=INDEX_BUILD_TIMEOUT_SECONDS
        )

    async def finish_rewrap(self) -> None:
        """Nothing to give back: the database manages its own files."""

    async def records_to_rewrap(self, key_id: str, after: str, limit: int) -> list[SealedSecret]:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        result: list[SealedSecret] = await self._mongo.run(
            "rewrap_find", rewrap.records_to_rewrap, self._secrets, key_id, after, limit
        )
        return result

    async def replace_sealed(self, old: SealedSecret, new: SealedSecret) -> bool:
        if new.record_key != old.record_key:
            raise ValueError("a record can only be replaced by a record with its own key")
        swapped: bool = await self._write(
            "rewrap_replace", rewrap.replace_sealed, self._secrets, old, new
        )
        return swapped

    def _convert_sync(self, old: SealedSecret, new: SealedSecret) -> bool:
        with pymongo.timeout(self._mongo.timeout):  # its few round trips in one budget
            return rewrap.convert_sealed(self._secrets, old, new)

    async def convert_sealed(self, old: SealedSecret, new: SealedSecret) -> bool:
        if not keyed_by_id(old.record_key) or new.record_key != record_key(old.record_key):
            raise ValueError("only a record keyed by its id converts, to its own record key")
        moved: bool = await self._write("rewrap_convert", self._convert_sync, old, new)
        return moved

    async def count_to_rewrap(self, key_id: str) -> Remaining:
        remaining: Remaining = await self._mongo.run(
            "rewrap_count", rewrap.count_to_rewrap, self._secrets, key_id
        )
        return remaining

    def _ensure_kid_index_sync(self) -> None:
        # Reachability first, under the store's own timeout: with the database down this
        # fails in seconds rather than waiting out the index build's long budget.
        self._mongo.client.admin.command("ping")
        # Found by its key, not its name: rewrap, another replica or an operator may have
        # made it, and some servers (nx-27017) name indexes their own way. An index that
        # starts with kid serves distinct and the counts as well.
        if any(
            [field for field, _ in info.get("key", [])][:1] == ["kid"]
            for info in self._secrets.index_information().values()
        ):
            return
        log.info("building the index on the secrets' key ids (once per database)")
        self._create_kid_index_sync()

    async def unknown_key_counts(self, known_key_ids: Iterable[str]) -> dict[str, int]:
        if not self._kid_index:
            await self._mongo.run(
                "key_id_index", self._ensure_kid_index_sync, timeout=INDEX_BUILD_TIMEOUT_SECONDS
            )
            self._kid_index = True
        counts: dict[str, int] = await self._mongo.run(
            "key_id_counts",
            rewrap.live_counts_of_unknown_keys,
            self._secrets,
            frozenset(known_key_ids),
            utc_now(),
            timeout=rewrap.KEY_COUNT_TIMEOUT_SECONDS,
        )
        return counts

    def _ensure_outbox_indexes(self) -> None:
        """The indexes on ``next_attempt_at`` (what is due) and ``created_at`` (the oldest),
        unless made already, under any name (another replica, nx-27017's own names)."""
        if self._outbox_indexes:
            return
        keys = {
            tuple(field for field, _ in info.get("key", []))
            for info in self._outbox.index_information().values()
        }
        for field in ("next_attempt_at", "created_at"):
            if (field,) not in keys:
                self._outbox.create_index(field, name=f"outbox_{field}")
        self._outbox_indexes = True

    async def add_events(self, events: Sequence[Event]) -> None:
        if events:
            await self._write("outbox_add", insert_events, self._outbox, events, utc_now())

    def _claim_sync(
        self, owner: str, now: dt.datetime, lease_seconds: float, limit: int
    ) -> list[PendingEvent]:
        """The events due, then each of them leased by one atomic update of its document
        (matched only while still due: of deliverers racing for it, one gets it), then the
        documents this call leased read back: three round trips, whatever the count. One
        event (a probe of receivers known down) in one round trip: see ``_claim_one``."""
        until = now + dt.timedelta(seconds=lease_seconds)
        until = until.replace(microsecond=until.microsecond // 1000 * 1000)  # as BSON keeps it
        lease = {"$set": {"lease_owner": owner, "lease_until": until, "next_attempt_at": until}}
        with pymongo.timeout(self._mongo.timeout):
            self._ensure_outbox_indexes()
            if limit == 1:
                return self._leased(self._claim_one(now, lease), owner)
            due = [
                doc["_id"]
                for doc in self._outbox.find({"next_attempt_at": {"$lte": now}}, {"_id": 1})
                .sort("next_attempt_at", 1)
                .limit(limit)
            ]
            if not due:
                return []
            self._outbox.update_many({"_id": {"$in": due}, "next_attempt_at": {"$lte": now}}, lease)
            # A document this owner leased before has its lease's end as next_attempt_at,
            # past ``now``: it was not due, so only this call's leases match.
            leased = self._outbox.find(
                {"_id": {"$in": due}, "lease_owner": owner, "lease_until": until}
            )
            claimed = self._leased(leased, owner)
        claimed.sort(key=lambda pending: (pending.created_at, pending.event.at))
        return claimed

    def _claim_one(self, now: dt.datetime, lease: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The soonest due event, leased and read back by one findAndModify: one round trip,
        answered through the ``next_attempt_at`` index with the first match. The batch's
        query reads every due event before its limit on nx-27017 (40 ms of its CPU at
        4,000 waiting), which a probe of a dead receiver's backlog paid each time."""
        doc = self._outbox.find_one_and_update(
            {"next_attempt_at": {"$lte": now}},
            lease,
            sort=[("next_attempt_at", 1)],
            return_document=pymongo.ReturnDocument.AFTER,
        )
        return [] if doc is None else [doc]

    def _leased(self, docs: Iterable[Mapping[str, Any]], owner: str) -> list[PendingEvent]:
        """The events of the documents just leased to ``owner``; one that is malformed
        (edited in the database: it could never be delivered) is removed, with a log line."""
        claimed: list[PendingEvent] = []
        malformed: list[object] = []
        for doc in docs:
            try:
                claimed.append(pending_of(doc))
            except MALFORMED_EVENT:
                malformed.append(doc["_id"])
        if malformed:
            self._outbox.delete_many({"_id": {"$in": malformed}, "lease_owner": owner})
            for event_id in malformed:
                log.warning("outbox event %s is malformed; removed undelivered", event_id)
        return claimed

    async def claim_events(
        self, owner: str, now: dt.datetime, lease_seconds: float, limit: int
    ) -> list[PendingEvent]:
        if limit < 1:
            return []
        claimed: list[PendingEvent] = await self._write(
            "outbox_claim", self._claim_sync, owner, now, lease_seconds, limit
        )
        return claimed

    def _settle_sync(self, items: list[Settlement]) -> list[bool]:
        """Every settlement of the batch in two round trips, whatever its size: which events
        their owners still lease, then one unordered bulk write of the settlements of those,
        each conditional on the lease again; whether each applied. Should a lease end
        between the two (it outlives its attempt by seconds), the events are looked up once
        more: a removed one counts as applied when gone, a rescheduled one when unleased."""
        if not items:
            return []
        ids = [item.event_id for item in items]
        with pymongo.timeout(self._mongo.timeout):
            owners = {
                doc["_id"]: doc.get("lease_owner")
                for doc in self._outbox.find({"_id": {"$in": ids}}, {"lease_owner": 1})
            }
            held = [owners.get(item.event_id, False) == item.owner for item in items]
            writes: list[DeleteOne | UpdateOne] = []
            for item, holds in zip(items, held, strict=True):
                if not holds:
                    continue
                leased = {"_id": item.event_id, "lease_owner": item.owner}
                if item.next_attempt_at is None:
                    writes.append(DeleteOne(leased))
                    continue
                update = {
                    "next_attempt_at": item.next_attempt_at,
                    "delivered": sorted(item.delivered_to),
                    "lease_owner": None,
                    "lease_until": None,
                }
                writes.append(UpdateOne(leased, {"$inc": {"attempts": 1}, "$set": update}))
            if not writes:
                return held
            result = self._outbox.bulk_write(writes, ordered=False)
            if result.deleted_count + result.matched_count == len(writes):
                return held
            after = {
                doc["_id"]: doc.get("lease_owner")
                for doc in self._outbox.find({"_id": {"$in": ids}}, {"lease_owner": 1})
            }
        return [
            holds
            and (
                item.event_id not in after
                if item.next_attempt_at is None
                else item.event_id in after and after[item.event_id] is None
            )
            for item, holds in zip(items, held, strict=True)
        ]

    async def _settle_batch(self, items: list[Settlement]) -> list[bool]:
        done: list[bool] = await self._write("outbox_settle", self._settle_sync, items)
        return done

    def _backlog_sync(self) -> tuple[int, dt.datetime | None]:
        """The count from the collection's metadata, not ``count_documents`` (which reads
        every document: 93 ms of nx-27017's CPU at 5,000 waiting events, and a scan on a
        real mongod too, every BACKLOG_SECONDS in every process), and the oldest through
        the ``created_at`` index."""
        with pymongo.timeout(self._mongo.timeout):
            self._ensure_outbox_indexes()
            count = self._outbox.estimated_document_count()
            oldest = self._outbox.find_one({}, {"created_at": 1}, sort=[("created_at", 1)])
        if oldest is None:
            return count, None
        try:
            return count, aware(oldest.get("created_at"))
        except TypeError:
            return count, None

    async def outbox_backlog(self, now: dt.datetime) -> tuple[int, dt.datetime | None]:
        backlog: tuple[int, dt.datetime | None] = await self._mongo.run(
            "outbox_backlog", self._backlog_sync
        )
        return backlog

    def _insert_audit_sync(self, documents: list[dict[str, Any]]) -> list[Exception | None]:
        # A duplicate _id is this very record (ids are made with the record), stored by an
        # attempt whose answer was lost; a duplicate under another unique index is a refusal.
        return insert_each(self._audit, documents, self._audits_stored)

    def _audits_stored(self, docs: list[dict[str, Any]]) -> set[object]:
        """The ``_id`` of those of ``docs`` whose record is already stored."""
        ids = [doc["_id"] for doc in docs]
        return {doc["_id"] for doc in self._audit.find({"_id": {"$in": ids}}, {"_id": 1})}

    async def _insert_audit_batch(self, documents: list[dict[str, Any]]) -> list[Exception | None]:
        try:
            results: list[Exception | None] = await self._write(
                "insert_audit", self._insert_audit_sync, documents
            )
        except Exception as exc:  # the whole call failed: every record in it may be retried
            raise unavailable(exc) from exc
        return results

    async def insert_audit(self, record: AuditRecord) -> Exception | None:
        try:
            doc = audit_document(record.as_document())
        except MALFORMED_AUDIT as exc:  # refused alone
            return exc
        return await stored_or_refused(self._audits.submit(doc))

    def _retention_sync(self, ttl_days: int) -> None:
        self._audit.create_index("secret_id_hmac", name="secret_id_hmac")
        wanted = ttl_days * 86400 if ttl_days else None
        # Found by its key, not its name: some servers (nx-27017) name indexes their own way,
        # and an index on ts made by hand counts as well.
        ttl = {
            name: info.get("expireAfterSeconds")
            for name, info in self._audit.index_information().items()
            if [field for field, _ in info.get("key", [])] == ["ts"]
            and "expireAfterSeconds" in info
        }
        kept = False
        for name, seconds in ttl.items():
            if seconds == wanted and not kept:
                kept = True
            else:
                self._audit.drop_index(name)
        if wanted is not None and not kept:
            self._audit.create_index("ts", name=_TTL_INDEX, expireAfterSeconds=wanted)

    async def apply_audit_retention(self, ttl_days: int) -> None:
        """A TTL index on ``ts``: MongoDB itself deletes records older than the retention."""
        await self._write("audit_retention", self._retention_sync, ttl_days)

    def _ping_sync(self) -> None:
        # Readiness probes (Swarm, a load balancer) time out in a few seconds themselves.
        with pymongo.timeout(min(self._mongo.timeout, PING_TIMEOUT_SECONDS)):
            self._mongo.client.admin.command("ping")

    def _probe_sync(self, room: int) -> None:
        with pymongo.timeout(min(self._mongo.timeout, PING_TIMEOUT_SECONDS)):
            self._readiness.update_one(
                {"_id": "readyz"}, {"$set": {"checked_at": utc_now()}}, upsert=True
            )
            if room:  # random: the server compresses what it stores, zeros to nothing
                self._readiness.replace_one(
                    {"_id": "readyz-room"}, {"bytes": os.urandom(room)}, upsert=True
                )

    async def _probe(self) -> None:
        """The readiness probe's write: the document ``readyz``, and while writes fail also
        ``readyz-room``, as large as the largest create. Only that proves a create fits
        again: a small write can succeed where a create's cannot. Its outcome goes to
        self.health."""
        room = self._probe_room if self.health.failing is not None else 0
        # A failure is not raised here: its reason is in self.health, which ping raises.
        with contextlib.suppress(StoreUnavailable, PyMongoError):
            await self._write("readiness_probe", self._probe_sync, room, proves=bool(room))

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers and writes work (NotReady
        then, with the reason). With no write telling anything in the last second, the
        probe writes itself (``_probe``), so it sees writes work again (or not) while no
        traffic comes."""
        if self.health.claim_probe():
            await self._probe()
        else:
            try:
                await self._mongo.run("ping", self._ping_sync)
            except StoreUnavailable:
                raise NotReady(UNREACHABLE) from None
        self.health.raise_if_failing()
