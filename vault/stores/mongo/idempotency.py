"""Idempotent creates' records as documents of the ``idempotency`` collection.

MongoDB has no transaction here, so a create writes its key first (``pending``), then its
secret, then marks the key ``done``: a repeat meeting a pending key meets a create still
in flight (409). A pending key older than ``stale_after`` is a create cut short between
its writes: its secret, stored or not, says how it ended. Times are Unix seconds."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, WriteError

from vault.records import IdempotentCreate, SealedSecret

PENDING, DONE = "pending", "done"
MARK_DONE = {"$set": {"state": DONE}}  # the update that finishes a key whose secret is stored
Documents = Collection[dict[str, Any]]


def _document(create: IdempotentCreate, state: str) -> dict[str, Any]:
    return {
        "_id": create.key,
        "body_digest": create.body_digest,
        "kid": create.answer.key_id,
        "nonce": create.answer.nonce,
        "ct": create.answer.ciphertext,
        "record_key": create.record_key,
        "created_at": create.created_at.timestamp(),
        "expires_at": create.expires_at.timestamp(),
        "state": state,
    }


def pending_document(create: IdempotentCreate) -> dict[str, Any]:
    """The document that claims ``create``'s key while its secret is written."""
    return _document(create, PENDING)


def _create_of(doc: Mapping[str, Any]) -> IdempotentCreate:
    key = str(doc["_id"])
    return IdempotentCreate(
        key=key,
        body_digest=str(doc["body_digest"]),
        answer=SealedSecret(key, str(doc["kid"]), bytes(doc["nonce"]), bytes(doc["ct"])),
        record_key=str(doc["record_key"]),
        created_at=dt.datetime.fromtimestamp(doc["created_at"], dt.UTC),
        expires_at=dt.datetime.fromtimestamp(doc["expires_at"], dt.UTC),
        state=str(doc["state"]),
    )


def claim(
    keys: Documents,
    secrets: Documents,
    create: IdempotentCreate,
    now: dt.datetime,
    stale_after: float,
) -> IdempotentCreate | None:
    """Store ``create``'s key as pending (None), or return the create already stored
    under it within its window (the caller repeats that one's answer, or refuses).

    A key found under ``create``'s own record is this create's claim, stored by an
    attempt whose answer was lost: claimed. An insert refused for a reason other than a
    duplicate may have been stored all the same (nx-27017 answers two racing inserts of
    one key so, now and then), so the key is looked up then too; that error is raised
    only if no attempt settles the key."""
    existing: IdempotentCreate | None = None
    refused: WriteError | None = None
    for _ in range(3):  # a key purged or cut short meanwhile is claimed again
        try:
            keys.insert_one(_document(create, PENDING))
            return None
        except DuplicateKeyError:
            refused = None
        except WriteError as exc:
            refused = exc
        doc = keys.find_one({"_id": create.key})
        if doc is None:
            continue
        refused, existing = None, _create_of(doc)
        if existing.record_key == create.record_key:
            return None
        if existing.expires_at <= now:  # past its window: a new create may take the key
            keys.delete_one({"_id": create.key, "created_at": doc["created_at"]})
            continue
        if existing.state == PENDING and (now - existing.created_at).total_seconds() > stale_after:
            if secrets.find_one({"_id": existing.record_key}, {"_id": 1}) is not None:
                keys.update_one({"_id": create.key}, {"$set": {"state": DONE}})
                return replace(existing, state=DONE)
            keys.delete_one({"_id": create.key, "created_at": doc["created_at"]})
            continue
        return existing
    if refused is not None:
        raise refused
    return existing


def finish(keys: Documents, stored: Sequence[str], failed: Sequence[str]) -> None:
    """After the secrets' insert: the keys whose secret is stored are done; the keys of
    those refused are removed, so a retry may claim them."""
    if stored:
        keys.update_many({"_id": {"$in": list(stored)}}, MARK_DONE)
    if failed:
        keys.delete_many({"_id": {"$in": list(failed)}, "state": PENDING})


def purge(keys: Documents, now: dt.datetime) -> int:
    return keys.delete_many({"expires_at": {"$lte": now.timestamp()}}).deleted_count
