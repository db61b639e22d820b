"""MongoDB store through pymongo, every call in a dedicated thread pool.

The pool has as many threads as pymongo's connection pool has connections, so a thread
never waits for a pooled connection, and it is separate from anyio's default thread
limiter (40 threads) so other thread work cannot starve the store. Timeouts are client-side
operation timeouts (``timeoutMS``): server selection, connection checkout and retries all
fit in one budget, so a client gets a 503 within seconds when the database is gone instead
of pymongo's 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pymongo
from bson import ObjectId
from bson.errors import InvalidId
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    PyMongoError,
    WriteConcernError,
    WriteError,
)
from pymongo.write_concern import WriteConcern

from observability.audit import AuditRecord
from observability.metrics import STORE_BREAKER_OPEN, STORE_BREAKER_OPENED, STORE_SHORT_CIRCUITED
from vault.breaker import Call, CircuitBreaker
from vault.errors import CorruptRecord, NotReady, StoreKnownDown, StoreUnavailable
from vault.lifecycle import Opener, takes_a_read
from vault.records import SealedSecret, StoredSecret
from vault.stores.base import (
    AUDIT_FIELDS,
    AuditDocument,
    AuditWrite,
    DeleteResult,
    FetchResult,
    Imported,
    derived_record_id,
    fetch_results,
    import_outcome,
    insert_results,
    judge_each,
    run_off_loop,
    stamped_audits,
    store_executor,
    stored_or_refused,
    unavailable,
    utc_now,
)
from vault.stores.batching import Batcher
from vault.stores.health import DISK_FULL, REFUSING_WRITES, UNREACHABLE, WriteHealth, stored_any

_FORMAT_VERSION = 1
_DUPLICATE_KEY = 11000
_TTL_INDEX = "ts_ttl"
_EXPIRY_INDEX = "expires_at_ttl"
_KID_INDEX = "kid"
PING_TIMEOUT_SECONDS = 2.0
CLOSE_TIMEOUT_SECONDS = 2.0
# While the database is known down, one request tries it again this often (the others are
# answered 503 at once): short, so that service resumes well within a second of its return.
BREAKER_RETRY_SECONDS = 0.2
# Building the key id index reads the whole collection: it gets far more than a request's budget.
INDEX_BUILD_TIMEOUT_SECONDS = 600.0
# Counting the live records of each unknown key id, through the index: several reads in one
# budget, which a key sealing millions of records may need more than a request's for.
KEY_COUNT_TIMEOUT_SECONDS = 60.0
# What a create writes beside its record's bytes (its audit record, index entries), at most.
_CREATE_BYTES_BESIDE_RECORD = 4096


log = logging.getLogger("secret_manager.store")

# A create's batch item: its document, and the audit record to write once it is stored.
_Insert = tuple[dict[str, Any], AuditRecord | None]
# A fetch's batch item: the id, what opens the record, and the audit record to write.
_Fetch = tuple[str, Opener, AuditRecord | None]


def _is_unavailable(exc: PyMongoError) -> bool:
    """Errors that mean 'the database is not reachable or not writable right now'."""
    return isinstance(exc, ConnectionFailure | WriteConcernError) or bool(exc.timeout)


def _unavailable(exc: PyMongoError) -> StoreUnavailable:
    """An error ``_is_unavailable`` names, as StoreUnavailable with its reason for /readyz."""
    # Written perhaps, but not confirmed: the server answers yet does not take writes.
    reason = REFUSING_WRITES if isinstance(exc, WriteConcernError) else UNREACHABLE
    return StoreUnavailable(type(exc).__name__, reason=reason)


_OUT_OF_DISK_SPACE = 14031  # the server's own error code when its disk is full


def _reason(exc: Exception) -> str:
    """What /readyz says when a write failed with ``exc`` that names no reason of its own."""
    if isinstance(exc, StoreUnavailable):
        return UNREACHABLE  # no answer within its budget, or the breaker knows it is down
    if isinstance(exc, PyMongoError) and getattr(exc, "code", None) == _OUT_OF_DISK_SPACE:
        return DISK_FULL
    return REFUSING_WRITES


def _is_down(exc: PyMongoError) -> bool:
    """Connection-level failures (refused, reset, no server selectable, a timeout): the
    database did not answer, so the next call would most likely not be answered either."""
    return isinstance(exc, ConnectionFailure) or bool(exc.timeout)


def store_breaker(store: str) -> CircuitBreaker:
    """The breaker of one database connection, reported as ``store`` in the metrics."""
    is_open = STORE_BREAKER_OPEN.labels(store)
    opened = STORE_BREAKER_OPENED.labels(store)
    refused = STORE_SHORT_CIRCUITED.labels(store)
    is_open.set(0)

    def on_open() -> None:
        is_open.set(1)
        opened.inc()
        log.warning(
            "store %s is down; answering 503 at once, one request trying it every %g s",
            store,
            BREAKER_RETRY_SECONDS,
        )

    def on_close() -> None:
        is_open.set(0)
        log.warning("store %s answers again", store)

    return CircuitBreaker(
        retry_after=BREAKER_RETRY_SECONDS,
        on_open=on_open,
        on_close=on_close,
        on_refused=refused.inc,
    )


def _sealed(doc: Mapping[str, Any]) -> SealedSecret:
    """The record a document holds; TypeError or KeyError when a field is missing or of
    the wrong type (``bytes(12)`` would quietly make twelve zero bytes of an int)."""
    key_id, nonce, ciphertext = doc["kid"], doc["nonce"], doc["ct"]
    if not (isinstance(key_id, str) and isinstance(nonce, bytes) and isinstance(ciphertext, bytes)):
        raise TypeError("a field of a stored secret record has the wrong type")
    expires_at, reads_left = doc.get("expires_at"), doc.get("reads_left")
    if not (expires_at is None or isinstance(expires_at, dt.datetime)):
        raise TypeError("a field of a stored secret record has the wrong type")
    if reads_left is not None and (type(reads_left) is not int):  # bool is no count
        raise TypeError("a field of a stored secret record has the wrong type")
    if expires_at is not None and expires_at.tzinfo is None:  # a client without tz_aware
        expires_at = expires_at.replace(tzinfo=dt.UTC)
    return SealedSecret(
        secret_id=str(doc["_id"]),
        key_id=key_id,
        nonce=bytes(nonce),
        ciphertext=bytes(ciphertext),
        expires_at=expires_at,
        reads_left=reads_left,
    )


def _document(record: SealedSecret, created_at: dt.datetime | None) -> dict[str, Any]:
    """The document a record is stored as."""
    doc: dict[str, Any] = {
        "_id": record.secret_id,
        "v": _FORMAT_VERSION,
        "kid": record.key_id,
        "nonce": record.nonce,
        "ct": record.ciphertext,
    }
    if created_at is not None:
        doc["created_at"] = created_at
    # Present only when set: the TTL index ignores documents without the field.
    if record.expires_at is not None:
        doc["expires_at"] = record.expires_at
    if record.reads_left is not None:
        doc["reads_left"] = record.reads_left
    return doc


def _audit_document(document: AuditDocument) -> dict[str, Any]:
    """An audit record as stored: its ``record_id`` is the ``_id``, so a retry finds it
    stored. KeyError, TypeError or InvalidId when the record is malformed."""
    record_id = ObjectId(document["record_id"])
    return {
        "_id": record_id,
        **{name: document[name] for name in AUDIT_FIELDS if name != "record_id"},
    }


_MALFORMED_AUDIT = (KeyError, TypeError, InvalidId)  # what _audit_document raises


def _sealed_or_corrupt(doc: Mapping[str, Any]) -> SealedSecret | CorruptRecord:
    try:
        return _sealed(doc)
    except (KeyError, TypeError, ValueError):
        # The message names no field values: the document may hold anything.
        return CorruptRecord("a stored secret record is malformed")


def _insert_each(
    collection: Collection[dict[str, Any]],
    docs: list[dict[str, Any]],
    already_stored: Callable[[list[dict[str, Any]]], set[object]],
) -> list[Exception | None]:
    """An unordered ``insert_many``; one entry per document: None when it is stored, else
    its own error. Of the documents refused as duplicate keys, those ``already_stored``
    names (by ``_id``) count as stored: retries of writes whose first attempt landed."""
    try:
        collection.insert_many(docs, ordered=False)
        return [None] * len(docs)
    except BulkWriteError as exc:
        if exc.details.get("writeConcernErrors"):
            # Written perhaps, but not confirmed durable: nobody may be acknowledged.
            raise WriteConcernError("write concern not satisfied") from None
        failed = {error["index"]: error for error in exc.details.get("writeErrors", [])}
    duplicates = [docs[i] for i, error in failed.items() if error.get("code") == _DUPLICATE_KEY]
    stored = already_stored(duplicates) if duplicates else set()
    results: list[Exception | None] = [None] * len(docs)
    for index, error in failed.items():
        if error.get("code") == _DUPLICATE_KEY and docs[index]["_id"] in stored:
            continue
        results[index] = WriteError(error.get("errmsg"), error.get("code"))
    return results


def _sealed_by(doc: Mapping[str, Any]) -> tuple[object, bytes | None]:
    nonce = doc.get("nonce")
    return doc.get("kid"), bytes(nonce) if isinstance(nonce, bytes) else None


class MongoConnection:
    """A pymongo client whose every call runs in a thread pool as large as its own pool.

    Shared by the secret store and the rate-limit counters; ``run`` turns errors that mean
    "not reachable or not writable now" into StoreUnavailable and lets the rest through.
    Its ``breaker`` opens on a connection-level failure: calls then raise StoreUnavailable at
    once, without a thread hand-off, while one probe at a time tries the database.
    """

    def __init__(self, uri: str, *, pool_size: int, timeout: float, store: str = "secrets") -> None:
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.timeout = timeout
        self._pool_size = pool_size
        # The driver times out first; the outer deadline only catches a stuck thread.
        self._deadline = timeout + 1.0
        self.client: MongoClient[dict[str, Any]] = MongoClient(
            uri,
            timeoutMS=int(timeout * 1000),
            maxPoolSize=pool_size,
            retryWrites=True,
            retryReads=True,
            appname="secret-manager",
            tz_aware=True,
            connect=False,
        )
        self._executor: ThreadPoolExecutor | None = None
        self.breaker = store_breaker(store)

    async def open(self) -> None:
        self._executor = store_executor(self._pool_size, "mongo")

    def _close_sync(self) -> None:
        # close() ends the client's server sessions, selecting a server for that under
        # serverSelectionTimeoutMS (30 s), not timeoutMS: with the database down it would
        # hold a shutdown past any graceful timeout. Ending sessions is best effort anyway.
        with pymongo.timeout(min(self.timeout, CLOSE_TIMEOUT_SECONDS)):
            self.client.close()

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, self._close_sync)

    async def run(
        self, operation: str, func: Any, *args: object, timeout: float | None = None
    ) -> Any:
        """Run ``func(*args)`` in the pool; ``timeout`` replaces the store's budget for calls
        that wrap themselves in a longer ``pymongo.timeout``."""
        if self._executor is None:
            raise RuntimeError("MongoDB used before open()")
        call = self.breaker.try_call()
        if call is None:
            raise StoreKnownDown("the database is known to be down; not tried")
        try:
            result = await run_off_loop(
                func,
                *args,
                executor=self._executor,
                timeout=self._deadline if timeout is None else timeout + 1.0,
                operation=operation,
                system="mongodb",
            )
        except PyMongoError as exc:
            self._judge(call, exc)
            if _is_unavailable(exc):
                raise _unavailable(exc) from None
            raise
        except StoreUnavailable:  # the outer deadline: the driver did not end the call
            self.breaker.failed(call)
            raise
        except BaseException:  # cancelled, or not the database's doing
            self.breaker.abandoned(call)
            raise
        self.breaker.succeeded(call)
        return result

    def _judge(self, call: Call, exc: PyMongoError) -> None:
        if _is_down(exc):
            self.breaker.failed(call)
        else:  # the database answered, if only to refuse: it is up
            self.breaker.succeeded(call)


class MongoStore:
    """Secrets in the ``secrets`` collection of MONGO_DB, keyed by secret id."""

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
    ) -> None:
        self._mongo = MongoConnection(uri, pool_size=pool_size, timeout=timeout)
        durable = WriteConcern(w=write_concern, j=journal)
        db = self._mongo.client[database]
        self._secrets: Collection[dict[str, Any]] = db.get_collection(
            "secrets", write_concern=durable
        )
        self._audit: Collection[dict[str, Any]] = db.get_collection("audit", write_concern=durable)
        # The documents the readiness probe rewrites to learn whether writes work; no secret.
        self._readiness: Collection[dict[str, Any]] = db.get_collection(
            "readiness", write_concern=durable
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
        self._expiry_index = False  # the TTL index on expires_at, made by the first purge
        self._kid_index = False  # the index on kid, made by the first key guard check

    async def open(self) -> None:
        await self._mongo.open()

    async def close(self) -> None:
        await self._inserts.close()
        await self._reads.close()
        await self._audits.close()
        await self._mongo.close()

    def _insert_many_sync(self, items: list[_Insert]) -> list[AuditWrite | Exception | None]:
        """Insert a batch, then the audit records of the records stored, in one budget; one
        answer per item: its record's own error, or its audit record's write."""
        with pymongo.timeout(self._mongo.timeout):
            results = _insert_each(self._secrets, [doc for doc, _ in items], self._already_stored)
            audits = stamped_audits(items, results)
            errors = self._write_audits_sync(audits)
        return insert_results(results, audits, errors)

    def _write_audits_sync(self, audits: Mapping[int, AuditRecord]) -> dict[int, Exception | None]:
        """Write the audit records riding with a batch (after its own records): each one's
        error (None: written), by its item's index. Raises only when the database did not
        take the call (down, timed out): the batch's requests are then answered 503 like
        any outage's."""
        errors: dict[int, Exception | None] = {}
        docs: dict[int, dict[str, Any]] = {}
        for k, audit in audits.items():
            try:
                docs[k] = _audit_document(audit.as_document())
            except _MALFORMED_AUDIT as exc:  # refused alone
                errors[k] = exc
        if not docs:
            return errors
        try:
            results: list[Exception | None] = self._insert_audit_sync(list(docs.values()))
        except PyMongoError as exc:
            if _is_unavailable(exc):
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
            self._mongo.run(operation, func, *args), _reason, proves=proves
        )

    async def _insert_batch(self, items: list[_Insert]) -> list[AuditWrite | Exception | None]:
        results: list[AuditWrite | Exception | None] = await self._write(
            "insert", self._insert_many_sync, items, proves=stored_any
        )
        return results

    async def insert(
        self, record: SealedSecret, audit: AuditRecord | None = None
    ) -> AuditWrite | None:
        written: AuditWrite | None = await self._inserts.submit(
            (_document(record, dt.datetime.now(dt.UTC)), audit)
        )
        return written

    def _find_many_sync(self, secret_ids: list[str]) -> list[SealedSecret | Exception | None]:
        """One entry per id: its record, None when there is none, or CorruptRecord for a
        malformed one, which fails only the requests for that id."""
        wanted = list(dict.fromkeys(secret_ids))  # concurrent fetches of one id: read it once
        if len(wanted) == 1:
            doc = self._secrets.find_one({"_id": wanted[0]})
            found = {} if doc is None else {wanted[0]: _sealed_or_corrupt(doc)}
        else:
            cursor = self._secrets.find({"_id": {"$in": wanted}})
            found = {str(doc["_id"]): _sealed_or_corrupt(doc) for doc in cursor}
        return [found.get(secret_id) for secret_id in secret_ids]

    def _fetch_many_sync(self, items: list[_Fetch]) -> list[FetchResult | Exception]:
        """A batch of fetches in one budget: the records read, the reads taken (each its
        own atomic update), then the audit records; one answer per item."""
        secret_ids = [secret_id for secret_id, _, _ in items]
        now = utc_now()
        with pymongo.timeout(self._mongo.timeout):
            records = self._find_many_sync(secret_ids)
            for k, record in enumerate(records):
                if takes_a_read(record, now):
                    records[k] = self._take_read_sync(secret_ids[k])
            results, audits = judge_each(items, records, now)
            errors = self._write_audits_sync(
                {k: audit for k, audit in enumerate(audits) if audit is not None}
            )
        return fetch_results(results, audits, errors)

    async def _fetch_batch(self, items: list[_Fetch]) -> list[FetchResult | Exception]:
        results: list[FetchResult | Exception] = await self.health.track_writes(
            self._mongo.run("read", self._fetch_many_sync, items),
            _reason,
            writes=any(audit is not None for _, _, audit in items),
        )
        return results

    async def fetch(
        self, secret_id: str, opener: Opener, audit: AuditRecord | None = None
    ) -> FetchResult:
        result: FetchResult = await self._reads.submit((secret_id, opener, audit))
        return result

    def _take_read_sync(self, secret_id: str) -> SealedSecret | Exception | None:
        # One atomic document update per read: concurrent readers on any replica each
        # take a different count, and none gets past zero.
        doc = self._secrets.find_one_and_update(
            {"_id": secret_id, "reads_left": {"$gt": 0}},
            {"$inc": {"reads_left": -1}},
            return_document=pymongo.ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        if doc.get("reads_left") == 0:
            # The last read: the ciphertext goes before the answer does. Matched on the
            # count, so a record rewritten meanwhile is still removed only when used up.
            self._secrets.delete_one({"_id": secret_id, "reads_left": 0})
        return _sealed_or_corrupt(doc)

    def _delete_sync(self, secret_id: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = self._secrets.find_one_and_delete(
            {"_id": secret_id}, projection={"expires_at": 1, "reads_left": 1}
        )
        return doc

    async def delete(self, secret_id: str) -> DeleteResult:
        doc = await self._write("delete", self._delete_sync, secret_id)
        if doc is None or doc.get("reads_left") == 0:
            return DeleteResult.MISSING
        expires_at = doc.get("expires_at")
        if isinstance(expires_at, dt.datetime):
            if expires_at.tzinfo is None:
                expires_at = expires_at.replace(tzinfo=dt.UTC)
            if utc_now() >= expires_at:
                return DeleteResult.EXPIRED
        return DeleteResult.DELETED

    def _purge_sync(self, now: dt.datetime) -> int:
        if not self._expiry_index:
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

    def _not_sealed_by_sync(self, key_id: str, after: str, limit: int) -> list[SealedSecret]:
        cursor = (
            self._secrets.find({"kid": {"$ne": key_id}, "_id": {"$gt": after}})
            .sort("_id", pymongo.ASCENDING)
            .limit(limit)
        )
        return [_sealed(doc) for doc in cursor]

    async def records_not_sealed_by(
        self, key_id: str, after_secret_id: str, limit: int
    ) -> list[SealedSecret]:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        result: list[SealedSecret] = await self._mongo.run(
            "rewrap_find", self._not_sealed_by_sync, key_id, after_secret_id, limit
        )
        return result

    def _replace_sync(self, old: SealedSecret, new: SealedSecret) -> bool:
        update = {"$set": {"kid": new.key_id, "nonce": new.nonce, "ct": new.ciphertext}}
        swap = {"_id": old.secret_id, "kid": old.key_id, "nonce": old.nonce}
        if self._secrets.update_one(swap, update).matched_count == 1:
            return True
        # MongoDB matched nothing because the record changed or is gone. Some MongoDB-wire
        # servers (the nx-27017 test server) never match a binary value in an update's
        # filter, though: tell the two apart by reading the record, and if it is unchanged,
        # swap on the key id alone. Records are never edited, only rewrapped, and every
        # rewrap changes the key id, so that still never overwrites a concurrent rewrap.
        current = self._secrets.find_one({"_id": old.secret_id}, {"kid": 1, "nonce": 1})
        if current is None or _sealed_by(current) != (old.key_id, old.nonce):
            return False
        fallback = {"_id": old.secret_id, "kid": old.key_id}
        return self._secrets.update_one(fallback, update).matched_count == 1

    async def replace_sealed(self, old: SealedSecret, new: SealedSecret) -> bool:
        if new.secret_id != old.secret_id:
            raise ValueError("a record can only be replaced by a record with its own id")
        swapped: bool = await self._write("rewrap_replace", self._replace_sync, old, new)
        return swapped

    async def count_not_sealed_by(self, key_id: str) -> int:
        count: int = await self._mongo.run(
            "rewrap_count", self._secrets.count_documents, {"kid": {"$ne": key_id}}
        )
        return count

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

    def _unknown_key_counts_sync(self, known: frozenset[str], now: dt.datetime) -> dict[str, int]:
        live = {
            "$and": [
                {"$or": [{"expires_at": None}, {"expires_at": {"$gt": now}}]},
                {"$or": [{"reads_left": None}, {"reads_left": {"$gt": 0}}]},
            ]
        }
        counts: dict[str, int] = {}
        with pymongo.timeout(KEY_COUNT_TIMEOUT_SECONDS):
            for kid in self._secrets.distinct("kid"):  # a DISTINCT_SCAN of the kid index
                # A kid that is not a string is a malformed record: CorruptRecord on read.
                if not isinstance(kid, str) or kid in known:
                    continue
                found = self._secrets.count_documents({"kid": kid, **live})
                if found:
                    counts[kid] = found
        return counts

    async def unknown_key_counts(self, known_key_ids: Iterable[str]) -> dict[str, int]:
        if not self._kid_index:
            await self._mongo.run(
                "key_id_index", self._ensure_kid_index_sync, timeout=INDEX_BUILD_TIMEOUT_SECONDS
            )
            self._kid_index = True
        counts: dict[str, int] = await self._mongo.run(
            "key_id_counts",
            self._unknown_key_counts_sync,
            frozenset(known_key_ids),
            utc_now(),
            timeout=KEY_COUNT_TIMEOUT_SECONDS,
        )
        return counts

    def _insert_audit_sync(self, documents: list[dict[str, Any]]) -> list[Exception | None]:
        # A duplicate _id is this very record (ids are made with the record), stored by an
        # attempt whose answer was lost; a duplicate under another unique index is a refusal.
        def stored(docs: list[dict[str, Any]]) -> set[object]:
            ids = [doc["_id"] for doc in docs]
            return {doc["_id"] for doc in self._audit.find({"_id": {"$in": ids}}, {"_id": 1})}

        return _insert_each(self._audit, documents, stored)

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
            doc = _audit_document(record.as_document())
        except _MALFORMED_AUDIT as exc:  # refused alone
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


# Documents per find and insert_many when exporting and importing.
_BULK_BATCH = 1000
# A cursor of a whole-store export lives far longer than a request's budget; each round trip
# still fails within this when the database stops answering.
_BULK_SOCKET_TIMEOUT_SECONDS = 60.0


class MongoBulk:
    """Export from and import into one MongoDB database (``BulkStore``), on its own client.

    There is no snapshot: the export reads each document whole in ``_id`` order, and a
    document written during the export may or may not be in the file. Writes use the
    store's durable write concern (``majority``, journaled, unless configured otherwise).
    """

    def __init__(
        self,
        uri: str,
        database: str,
        *,
        write_concern: str | int = "majority",
        journal: bool = True,
        timeout: float,
    ) -> None:
        self.label = f"MongoDB database {database!r}"
        # Not timeoutMS: it would bound a whole cursor's life, and an export is one cursor.
        self._client: MongoClient[dict[str, Any]] = MongoClient(
            uri,
            serverSelectionTimeoutMS=int(timeout * 1000),
            connectTimeoutMS=int(timeout * 1000),
            socketTimeoutMS=int(_BULK_SOCKET_TIMEOUT_SECONDS * 1000),
            retryWrites=True,
            retryReads=True,
            appname="secret-manager-transfer",
            tz_aware=True,
        )
        durable = WriteConcern(w=write_concern, j=journal)
        db = self._client[database]
        self._secrets: Collection[dict[str, Any]] = db.get_collection(
            "secrets", write_concern=durable
        )
        self._audit: Collection[dict[str, Any]] = db.get_collection("audit", write_concern=durable)
        self.malformed = 0  # documents an export left out because they are not whole records

    def close(self) -> None:
        self._client.close()

    def snapshot(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def count_secrets(self) -> int:
        return self._secrets.count_documents({})

    def count_audit(self) -> int:
        return self._audit.count_documents({})

    def secrets(self, now: dt.datetime) -> Iterator[StoredSecret]:
        for doc in self._secrets.find({}, sort=[("_id", pymongo.ASCENDING)]).batch_size(
            _BULK_BATCH
        ):
            try:
                sealed = _sealed(doc)
            except (KeyError, TypeError, ValueError):
                self.malformed += 1  # named by nothing it holds: it may hold anything
                continue
            if sealed.expired(now) or sealed.reads_left == 0:
                continue
            created = doc.get("created_at")
            yield StoredSecret(
                sealed, created.astimezone(dt.UTC) if isinstance(created, dt.datetime) else None
            )

    def audit(self) -> Iterator[dict[str, Any]]:
        for doc in self._audit.find({}, sort=[("_id", pymongo.ASCENDING)]).batch_size(_BULK_BATCH):
            document = {name: doc.get(name) for name in AUDIT_FIELDS if name != "record_id"}
            record_id = doc["_id"]
            document["record_id"] = (
                str(record_id) if isinstance(record_id, ObjectId) else derived_record_id(document)
            )
            yield document

    def add_secrets(self, records: Sequence[StoredSecret]) -> list[Imported]:
        outcomes: list[Imported] = []
        for start in range(0, len(records), _BULK_BATCH):
            outcomes += self._add_secret_batch(records[start : start + _BULK_BATCH])
        return outcomes

    def _stored(self, ids: list[str]) -> dict[str, SealedSecret | None]:
        found: dict[str, SealedSecret | None] = {}
        for doc in self._secrets.find({"_id": {"$in": ids}}):
            try:
                found[str(doc["_id"])] = _sealed(doc)
            except (KeyError, TypeError, ValueError):
                found[str(doc["_id"])] = None  # malformed: never overwritten, a conflict
        return found

    def _add_secret_batch(self, records: Sequence[StoredSecret]) -> list[Imported]:
        stored = self._stored([record.sealed.secret_id for record in records])
        outcomes: list[Imported] = []
        new: list[dict[str, Any]] = []
        for record in records:
            sealed = record.sealed
            if sealed.secret_id in stored and stored[sealed.secret_id] is None:
                outcomes.append(Imported.CONFLICT)
                continue
            outcome = import_outcome(stored.get(sealed.secret_id), sealed)
            if outcome is Imported.NEW:
                new.append(_document(sealed, record.created_at))
            elif outcome is Imported.FEWER_READS:
                self._secrets.update_one(
                    {"_id": sealed.secret_id, "reads_left": {"$gt": sealed.reads_left}},
                    {"$set": {"reads_left": sealed.reads_left}},
                )
            if outcome in (Imported.NEW, Imported.FEWER_READS):
                stored[sealed.secret_id] = sealed  # the same id twice in one file
            outcomes.append(outcome)
        if new:
            results = _insert_each(self._secrets, new, lambda docs: set())
            refused = {doc["_id"] for doc, error in zip(new, results, strict=True) if error}
            if refused:  # written meanwhile by someone else: judge against what is there now
                now_stored = self._stored(sorted(refused))
                for index, record in enumerate(records):
                    if record.sealed.secret_id in refused and outcomes[index] is Imported.NEW:
                        current = now_stored.get(record.sealed.secret_id)
                        outcomes[index] = (
                            Imported.CONFLICT
                            if current is None
                            else import_outcome(current, record.sealed)
                        )
        return outcomes

    def add_audit(self, documents: Iterable[Mapping[str, Any]]) -> int:
        docs = [
            {
                "_id": ObjectId(document["record_id"]),
                **{name: document[name] for name in AUDIT_FIELDS if name != "record_id"},
            }
            for document in documents
        ]
        if not docs:
            return 0
        try:
            self._audit.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise WriteConcernError("write concern not satisfied") from None
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != _DUPLICATE_KEY for error in errors):
                raise
            return len(docs) - len(errors)  # the duplicates: imported before
        return len(docs)
