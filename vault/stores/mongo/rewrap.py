"""Key rotation's work on the collection: paging through what a rewrap pass takes, swapping
a document's sealing in place, and moving a document stored under its id to its record key.

MongoDB has no transaction here (a standalone server has none), so a move inserts the
converted document, then deletes the one under the id. While both exist the converted one
is served (``lookup_keys``: the digest first), and a delete or a last read removes both. The
converted document carries ``moving`` (when the move began, and the reads it was copied
with) until the old one is gone, so that a move cut short is finished by the next pass,
with the reads taken from the old document meanwhile taken from the new one too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import pymongo
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from vault.records import SealedSecret
from vault.stores.base import Remaining, utc_now
from vault.stores.mongo.documents import FORMAT_VERSION, KEYED_BY_ID, record_of, sealed_by

Secrets = Collection[dict[str, Any]]

# A move older than this was cut short (a move takes a few round trips): the next pass
# finishes it. One younger is another pass's, under way: left to it.
STALE_MOVE_SECONDS = 60.0
# Counting the live records of each unknown key id, through the index: several reads in one
# budget, which a key sealing millions of records may need more than a request's for.
KEY_COUNT_TIMEOUT_SECONDS = 60.0


def _to_rewrap(key_id: str) -> dict[str, Any]:
    return {"$or": [{"kid": {"$ne": key_id}}, KEYED_BY_ID]}


def records_to_rewrap(secrets: Secrets, key_id: str, after: str, limit: int) -> list[SealedSecret]:
    cursor = (
        secrets.find({**_to_rewrap(key_id), "_id": {"$gt": after}})
        .sort("_id", pymongo.ASCENDING)
        .limit(limit)
    )
    return [record_of(doc) for doc in cursor]


def replace_sealed(secrets: Secrets, old: SealedSecret, new: SealedSecret) -> bool:
    update = {"$set": {"kid": new.key_id, "nonce": new.nonce, "ct": new.ciphertext}}
    swap = {"_id": old.record_key, "kid": old.key_id, "nonce": old.nonce}
    if secrets.update_one(swap, update).matched_count == 1:
        return True
    # MongoDB matched nothing because the record changed or is gone. Some MongoDB-wire
    # servers (the nx-27017 test server) never match a binary value in an update's
    # filter, though: tell the two apart by reading the record, and if it is unchanged,
    # swap on the key id alone. Records are never edited, only rewrapped, and every
    # rewrap changes the key id, so that still never overwrites a concurrent rewrap.
    current = secrets.find_one({"_id": old.record_key}, {"kid": 1, "nonce": 1})
    if current is None or sealed_by(current) != (old.key_id, old.nonce):
        return False
    fallback = {"_id": old.record_key, "kid": old.key_id}
    return secrets.update_one(fallback, update).matched_count == 1


def convert_sealed(secrets: Secrets, old: SealedSecret, new: SealedSecret) -> bool:
    """Move legacy document ``old`` to ``new``'s record key and sealing (see the module)."""
    legacy, key = old.record_key, new.record_key
    current = secrets.find_one({"_id": legacy})
    if current is None or sealed_by(current) != (old.key_id, old.nonce):
        return False  # changed or gone since the pass read it
    reads = current.get("reads_left")
    moved = {
        **current,  # its lifecycle and creation time, as they are now
        "_id": key,
        "v": FORMAT_VERSION,
        "kid": new.key_id,
        "nonce": new.nonce,
        "ct": new.ciphertext,
        "moving": {"since": utc_now(), "reads_left": reads},
    }
    try:
        secrets.insert_one(moved)
    except DuplicateKeyError:  # a move cut short, or a record imported under its key
        return _finish(secrets, legacy, key)
    gone = secrets.find_one_and_delete({"_id": legacy})
    if gone is None:
        # Deleted or used up since it was read (both remove the secret under both keys, but
        # may have come before the insert): the copy would bring it back.
        secrets.delete_one({"_id": key})
        return False
    _settle(secrets, key, reads, gone)
    return True


def _finish(secrets: Secrets, legacy: str, key: str) -> bool:
    """The record key holds a document already: it wins, and the one under the id goes."""
    existing = secrets.find_one({"_id": key}, {"moving": 1})
    if existing is None:
        return False  # deleted this instant: with it went the one under the id
    moving = existing.get("moving")
    if isinstance(moving, Mapping) and not _stale(moving.get("since")):
        return False  # another pass is moving it now; the next pass finds it done
    gone = secrets.find_one_and_delete({"_id": legacy})
    if isinstance(moving, Mapping):  # a move cut short: finish it as it would have
        if gone is None:
            secrets.update_one({"_id": key}, {"$unset": {"moving": ""}})
            return False
        _settle(secrets, key, moving.get("reads_left"), gone)
        return True
    if gone is None:
        return False
    # Stored under its key by other means (an import): that record keeps the fewer reads.
    reads = gone.get("reads_left")
    if type(reads) is int:
        secrets.update_one(
            {"_id": key, "reads_left": {"$gt": reads}}, {"$set": {"reads_left": reads}}
        )
        secrets.delete_one({"_id": key, "reads_left": {"$lte": 0}})
    return True


def _settle(secrets: Secrets, key: str, copied_reads: object, gone: Mapping[str, Any]) -> None:
    """The document under the id is gone: take from the moved one the reads taken from the
    old one since it was copied (a read is never given back), and end the move."""
    update: dict[str, Any] = {"$unset": {"moving": ""}}
    left = gone.get("reads_left")
    if type(copied_reads) is int and type(left) is int and copied_reads > left:
        update["$inc"] = {"reads_left": left - copied_reads}
    secrets.update_one({"_id": key}, update)
    if "$inc" in update:
        secrets.delete_one({"_id": key, "reads_left": {"$lte": 0}})  # used up meanwhile


def _stale(since: object) -> bool:
    if not isinstance(since, dt.datetime):
        return True
    if since.tzinfo is None:  # a client without tz_aware
        since = since.replace(tzinfo=dt.UTC)
    return (utc_now() - since).total_seconds() > STALE_MOVE_SECONDS


def count_to_rewrap(secrets: Secrets, key_id: str) -> Remaining:
    return Remaining(
        secrets.count_documents(_to_rewrap(key_id)),
        secrets.count_documents({"kid": {"$ne": key_id}}),
        secrets.count_documents(KEYED_BY_ID),
    )


def live_counts_of_unknown_keys(
    secrets: Secrets, known: frozenset[str], now: dt.datetime
) -> dict[str, int]:
    """The key guard's question: for each key id not in ``known`` that seals a live record
    (not expired, reads not used up), how many it seals; through the kid index."""
    live = {
        "$and": [
            {"$or": [{"expires_at": None}, {"expires_at": {"$gt": now}}]},
            {"$or": [{"reads_left": None}, {"reads_left": {"$gt": 0}}]},
        ]
    }
    counts: dict[str, int] = {}
    with pymongo.timeout(KEY_COUNT_TIMEOUT_SECONDS):
        for kid in secrets.distinct("kid"):  # a DISTINCT_SCAN of the kid index
            # A kid that is not a string is a malformed record: CorruptRecord on read.
            if not isinstance(kid, str) or kid in known:
                continue
            found = secrets.count_documents({"kid": kid, **live})
            if found:
                counts[kid] = found
    return counts
