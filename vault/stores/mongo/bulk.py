"""Export from and import into one MongoDB database, on a connection of its own."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import (
    BulkWriteError,
    WriteConcernError,
    WriteError,
)
from pymongo.write_concern import WriteConcern

from vault.records import Receipt, SealedSecret, StoredSecret
from vault.stores.base import (
    AUDIT_FIELDS,
    Imported,
    brought_forward,
    derived_record_id,
    import_keys,
    import_outcome,
    stored_for,
)
from vault.stores.mongo.documents import (
    DUPLICATE_KEY,
    KEYED_BY_ID,
    audit_document,
    document,
    insert_each,
    record_of,
)
from vault.stores.mongo.receipts import merge_updates, receipt_document, receipt_of

# Documents per find and insert_many when exporting and importing.
_BULK_BATCH = 1000


# A cursor of a whole-store export lives far longer than a request's budget; each round trip
# still fails within this when the database stops answering.
_BULK_SOCKET_TIMEOUT_SECONDS = 60.0


class MongoBulk:
    """Export from and import into one MongoDB database (``BulkStore``), on its own client.

    There is no snapshot: the export reads each document whole in ``_id`` (record key) order, and a
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
        self._receipts: Collection[dict[str, Any]] = db.get_collection(
            "receipts", write_concern=durable
        )
        self.malformed = 0  # documents an export left out because they are not whole records

    def close(self) -> None:
        self._client.close()

    def snapshot(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def count_secrets(self) -> int:
        return self._secrets.count_documents({})

    def count_keyed_by_id(self) -> int:
        return self._secrets.count_documents(KEYED_BY_ID)

    def count_audit(self) -> int:
        return self._audit.count_documents({})

    def secrets(self, now: dt.datetime) -> Iterator[StoredSecret]:
        for doc in self._secrets.find({}, sort=[("_id", pymongo.ASCENDING)]).batch_size(
            _BULK_BATCH
        ):
            try:
                sealed = record_of(doc)
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

    def _stored(self, keys: list[str]) -> dict[str, SealedSecret | None]:
        found: dict[str, SealedSecret | None] = {}
        for doc in self._secrets.find({"_id": {"$in": keys}}):
            try:
                found[str(doc["_id"])] = record_of(doc)
            except (KeyError, TypeError, ValueError):
                found[str(doc["_id"])] = None  # malformed: never overwritten, a conflict
        return found

    def _add_secret_batch(self, records: Sequence[StoredSecret]) -> list[Imported]:
        stored = self._stored(sorted({k for r in records for k in import_keys(r.sealed)}))
        outcomes: list[Imported] = []
        new: list[dict[str, Any]] = []
        for record in records:
            sealed = record.sealed
            key, held = stored_for(sealed, stored) or (sealed.record_key, None)
            if held is None and key in stored:
                outcomes.append(Imported.CONFLICT)
                continue
            outcome = import_outcome(held, sealed)
            if outcome is Imported.NEW:
                new.append(document(sealed, record.created_at))
                stored[key] = sealed  # the same record twice in one file
            elif outcome in (Imported.FEWER_READS, Imported.MORE_FAILURES) and held is not None:
                self._bring_forward(key, sealed)
                stored[key] = brought_forward(held, sealed)
            outcomes.append(outcome)
        if new:
            results = insert_each(self._secrets, new, lambda docs: set())
            refused = {doc["_id"] for doc, error in zip(new, results, strict=True) if error}
            if refused:  # written meanwhile by someone else: judge against what is there now
                now_stored = self._stored(sorted(refused))
                for index, record in enumerate(records):
                    if record.sealed.record_key in refused and outcomes[index] is Imported.NEW:
                        current = now_stored.get(record.sealed.record_key)
                        outcomes[index] = (
                            Imported.CONFLICT
                            if current is None
                            else import_outcome(current, record.sealed)
                        )
        return outcomes

    def _bring_forward(self, key: str, incoming: SealedSecret) -> None:
        """Lower the reads left and raise the wrong passphrase tries of the record under
        ``key`` to ``incoming``'s, each only where that is a step forward (the server may
        have taken reads or counted tries since the store was read)."""
        if incoming.reads_left is not None:
            self._secrets.update_one(
                {"_id": key, "reads_left": {"$gt": incoming.reads_left}},
                {"$set": {"reads_left": incoming.reads_left}},
            )
        if incoming.kdf is not None:
            self._secrets.update_one(
                {"_id": key, "passphrase_failures": {"$lt": incoming.passphrase_failures}},
                {"$set": {"passphrase_failures": incoming.passphrase_failures}},
            )

    def add_audit(self, documents: Iterable[Mapping[str, Any]]) -> int:
        docs = [audit_document(document) for document in documents]
        if not docs:
            return 0
        try:
            self._audit.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise WriteConcernError("write concern not satisfied") from None
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != DUPLICATE_KEY for error in errors):
                raise
            return len(docs) - len(errors)  # the duplicates: imported before
        return len(docs)

    def count_receipts(self) -> int:
        return self._receipts.count_documents({})

    def receipts(self) -> Iterator[Receipt]:
        for doc in self._receipts.find({}, sort=[("_id", pymongo.ASCENDING)]).batch_size(
            _BULK_BATCH
        ):
            try:
                yield receipt_of(doc)
            except (KeyError, TypeError, ValueError, OverflowError, OSError):
                continue  # not a whole receipt (an edit): it may hold anything

    def add_receipts(self, receipts: Sequence[Receipt]) -> int:
        new = 0
        for start in range(0, len(receipts), _BULK_BATCH):
            new += self._add_receipt_batch(receipts[start : start + _BULK_BATCH])
        return new

    def _add_receipt_batch(self, receipts: Sequence[Receipt]) -> int:
        """One ``insert_many`` of the receipts not stored, then one ``bulk_write`` bringing
        forward those that are (or were written meanwhile, or twice in the file)."""
        keys = sorted({receipt.receipt_key for receipt in receipts})
        held = {str(doc["_id"]) for doc in self._receipts.find({"_id": {"$in": keys}}, {"_id": 1})}
        new: list[Receipt] = []
        merged: list[Receipt] = []
        for receipt in receipts:
            (merged if receipt.receipt_key in held else new).append(receipt)
            held.add(receipt.receipt_key)
        docs = [receipt_document(receipt) for receipt in new]
        errors = insert_each(self._receipts, docs, lambda docs: set()) if docs else []
        for receipt, error in zip(new, errors, strict=True):
            if isinstance(error, WriteError) and error.code == DUPLICATE_KEY:
                merged.append(receipt)  # stored meanwhile: brought forward instead
            elif error is not None:
                raise error
        updates = [update for receipt in merged for update in merge_updates(receipt)]
        if updates:
            self._receipts.bulk_write(updates, ordered=True)
        return len(new) - sum(error is not None for error in errors)
