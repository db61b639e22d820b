"""Receipts as documents of the ``receipts`` collection, written in the call of the change
they record. Times are Unix seconds (numbers): ``$min`` and ``$max`` compare them alike on
every MongoDB-wire server."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from vault.lifecycle import ReceiptChange
from vault.records import Receipt, ReceiptState
from vault.stores.mongo.documents import DUPLICATE_KEY

Receipts = Collection[dict[str, Any]]


def _moment(seconds: object) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(seconds, dt.UTC) if isinstance(seconds, int | float) else None


def _seconds(moment: dt.datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def receipt_document(receipt: Receipt) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": receipt.receipt_key,
        "tenant": receipt.tenant,
        "created_at": receipt.created_at.timestamp(),
        "reads": receipt.reads,
        "state": receipt.state,
    }
    # Absent until set: $min and $max then set them, and "ended_at" absent means active.
    optional = {
        "label": receipt.label,
        "expires_at": _seconds(receipt.expires_at),
        "max_reads": receipt.max_reads,
        "first_read_at": _seconds(receipt.first_read_at),
        "last_read_at": _seconds(receipt.last_read_at),
        "ended_at": _seconds(receipt.ended_at),
        "passphrase_failures": receipt.passphrase_failures,
    }
    doc.update({name: value for name, value in optional.items() if value is not None})
    return doc


def insert_receipts(receipts: Receipts, docs: Sequence[dict[str, Any]]) -> None:
    """Store new receipts (``receipt_document``); one already stored is a retry's."""
    if not docs:
        return
    try:
        receipts.insert_many(list(docs), ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if exc.details.get("writeConcernErrors") or any(
            error.get("code") != DUPLICATE_KEY for error in errors
        ):
            raise


def apply_changes(receipts: Receipts, changes: Sequence[ReceiptChange]) -> None:
    """Record reads and ends: each an atomic update, so counts add up and the last read's
    time is the latest across replicas; a secret ends once (the first end wins)."""
    for change in changes:
        at = change.at.timestamp()
        if change.read:
            receipts.update_one(
                {"_id": change.receipt_key},
                {"$inc": {"reads": 1}, "$min": {"first_read_at": at}, "$max": {"last_read_at": at}},
            )
        if change.failed:
            receipts.update_one({"_id": change.receipt_key}, {"$inc": {"passphrase_failures": 1}})
        ended = ReceiptState.USED_UP if change.used_up else change.ended
        if ended is not None:
            receipts.update_one(
                {"_id": change.receipt_key, "ended_at": {"$exists": False}},
                {"$set": {"state": ended, "ended_at": at}},
            )


def merge_updates(receipt: Receipt) -> list[UpdateOne]:
    """An import's updates of a receipt stored already, for the same tenant: brought forward,
    never back (more reads, the earlier first and later last read, an end where it had
    none: a secret ends once). Nothing else changes. Each is a ``$set`` guarded by a filter
    that matches only when it moves the field forward (atomic, as ``$max`` is), so a
    receipt that is already as far along is not written at all: nx-27017 keeps a number an
    update writes to 15 significant digits, which would move a time by microseconds. A time
    not yet set and one behind are two updates: nx-27017 applies an update whose filter
    has a top-level ``$or`` beside ``_id`` to another document."""
    held = {"_id": receipt.receipt_key, "tenant": receipt.tenant}
    updates: list[UpdateOne] = []
    if receipt.reads:
        updates.append(
            UpdateOne({**held, "reads": {"$lt": receipt.reads}}, {"$set": {"reads": receipt.reads}})
        )
    for name, moment, later in (
        ("first_read_at", receipt.first_read_at, "$gt"),
        ("last_read_at", receipt.last_read_at, "$lt"),
    ):
        if moment is not None:
            at = moment.timestamp()
            for unset_or_behind in ({"$exists": False}, {later: at}):
                updates.append(UpdateOne({**held, name: unset_or_behind}, {"$set": {name: at}}))
    if receipt.passphrase_failures:
        wrong = receipt.passphrase_failures
        updates.append(
            UpdateOne(
                {**held, "passphrase_failures": {"$lt": wrong}},
                {"$set": {"passphrase_failures": wrong}},
            )
        )
    if receipt.ended_at is not None:
        updates.append(
            UpdateOne(
                {**held, "ended_at": {"$exists": False}},
                {"$set": {"state": receipt.state, "ended_at": receipt.ended_at.timestamp()}},
            )
        )
    return updates


def receipt_of(doc: Mapping[str, Any]) -> Receipt:
    max_reads, wrong = doc.get("max_reads"), doc.get("passphrase_failures")
    return Receipt(
        receipt_key=str(doc["_id"]),
        tenant=str(doc["tenant"]),
        label=doc.get("label"),
        created_at=dt.datetime.fromtimestamp(doc["created_at"], dt.UTC),
        expires_at=_moment(doc.get("expires_at")),
        max_reads=max_reads if type(max_reads) is int else None,
        reads=int(doc.get("reads", 0)),
        first_read_at=_moment(doc.get("first_read_at")),
        last_read_at=_moment(doc.get("last_read_at")),
        ended_at=_moment(doc.get("ended_at")),
        state=str(doc.get("state", ReceiptState.ACTIVE)),
        passphrase_failures=wrong if type(wrong) is int else None,
    )


def purge_receipts(receipts: Receipts, now: dt.datetime, retention_seconds: float) -> int:
    """Remove the receipts whose retention has run out (see the SQLite store's)."""
    cutoff = now.timestamp() - retention_seconds
    return receipts.delete_many(
        {
            "$or": [
                {"ended_at": {"$lte": cutoff}},
                {"ended_at": {"$exists": False}, "expires_at": {"$lte": cutoff}},
            ]
        }
    ).deleted_count
