"""A secret, an audit record and an outbox event as MongoDB documents, and the unordered
insert the first two use."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo.collection import Collection
from pymongo.errors import (
    BulkWriteError,
    WriteConcernError,
    WriteError,
)

from vault.errors import CorruptRecord
from vault.events import Event, PendingEvent, event_body
from vault.lifecycle import utc_now
from vault.records import (
    DEFAULT_TENANT,
    NOBODY,
    Access,
    SealedSecret,
    access_fields,
    passphrase_fields,
    receipt_fields,
)
from vault.stores.base import (
    AUDIT_FIELDS,
    AuditDocument,
)

# 2: keyed by the record key (the digest of the secret id); 1: keyed by the id itself.
FORMAT_VERSION = 2
DUPLICATE_KEY = 11000


# A record still stored under its secret id: 36 characters (vault/records.py keyed_by_id),
# where a record key is 64.
KEYED_BY_ID = {"_id": {"$regex": "^.{36}$"}}


def record_of(doc: Mapping[str, Any]) -> SealedSecret:
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
    tenant, owner, readers = access_of(doc)
    receipt_id, label, kdf = doc.get("receipt_id"), doc.get("label"), doc.get("kdf")
    if not all(value is None or isinstance(value, str) for value in (receipt_id, label, kdf)):
        raise TypeError("a field of a stored secret record has the wrong type")
    failures = doc.get("passphrase_failures", 0)
    if type(failures) is not int:
        raise TypeError("a field of a stored secret record has the wrong type")
    return SealedSecret(
        record_key=str(doc["_id"]),
        key_id=key_id,
        nonce=bytes(nonce),
        ciphertext=bytes(ciphertext),
        expires_at=expires_at,
        reads_left=reads_left,
        tenant=tenant,
        owner=owner,
        readers=readers,
        receipt_id=receipt_id,
        label=label,
        kdf=kdf,
        passphrase_failures=failures,
    )


def access_of(doc: Mapping[str, Any]) -> Access:
    """Who may see a document's secret; TypeError when a field has the wrong type."""
    tenant, owner, readers = doc.get("tenant", DEFAULT_TENANT), doc.get("owner"), doc.get("readers")
    if not (
        isinstance(tenant, str)
        and (owner is None or isinstance(owner, str))
        and (
            readers is None
            or (isinstance(readers, list) and all(isinstance(r, str) for r in readers))
        )
    ):
        raise TypeError("a field of a stored secret record has the wrong type")
    return Access(tenant, owner, None if readers is None else tuple(readers))


def found_for_delete(doc: Mapping[str, Any]) -> tuple[Access, dt.datetime | None, int | None]:
    """What a delete judges (vault/stores/base.py judge_delete): who may see the secret
    (NOBODY when that cannot be read: a delete must not fail on a record malformed
    elsewhere), its expiry and reads left (None where malformed)."""
    try:
        guard = access_of(doc)
    except TypeError:
        guard = NOBODY
    expires_at, reads_left = doc.get("expires_at"), doc.get("reads_left")
    if not isinstance(expires_at, dt.datetime):
        expires_at = None
    elif expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=dt.UTC)
    return guard, expires_at, reads_left if type(reads_left) is int else None


def document(record: SealedSecret, created_at: dt.datetime | None) -> dict[str, Any]:
    """The document a record is stored as."""
    doc: dict[str, Any] = {
        "_id": record.record_key,
        "v": FORMAT_VERSION,
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
    # Likewise who may see it: a plain secret is stored as before tenants existed.
    doc.update(access_fields(record))
    doc.update(receipt_fields(record))
    doc.update(passphrase_fields(record))
    return doc


def audit_document(document: AuditDocument) -> dict[str, Any]:
    """An audit record as stored: its ``record_id`` is the ``_id``, so a retry finds it
    stored. KeyError, TypeError or InvalidId when the record is malformed."""
    record_id = ObjectId(document["record_id"])
    return {
        "_id": record_id,
        **{name: document[name] for name in AUDIT_FIELDS if name != "record_id"},
    }


MALFORMED_AUDIT = (KeyError, TypeError, InvalidId)  # what audit_document raises


def sealed_or_corrupt(doc: Mapping[str, Any]) -> SealedSecret | CorruptRecord:
    try:
        return record_of(doc)
    except (KeyError, TypeError, ValueError):
        # The message names no field values: the document may hold anything.
        return CorruptRecord("a stored secret record is malformed")


def insert_each(
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
    duplicates = [docs[i] for i, error in failed.items() if error.get("code") == DUPLICATE_KEY]
    stored = already_stored(duplicates) if duplicates else set()
    results: list[Exception | None] = [None] * len(docs)
    for index, error in failed.items():
        if error.get("code") == DUPLICATE_KEY and docs[index]["_id"] in stored:
            continue
        results[index] = WriteError(error.get("errmsg"), error.get("code"))
    return results


def sealed_by(doc: Mapping[str, Any]) -> tuple[object, bytes | None]:
    nonce = doc.get("nonce")
    return doc.get("kid"), bytes(nonce) if isinstance(nonce, bytes) else None


# --- the outbox -------------------------------------------------------------------------
# One document per event in the collection ``outbox``: ``_id`` the event id, ``type``,
# ``at``, ``payload`` (the JSON body every delivery sends and signs, as text: exactly the
# same bytes on every attempt), ``attempts``, ``next_attempt_at`` (while a deliverer holds
# the lease, the lease's end), ``lease_owner``, ``lease_until``, ``delivered`` (the
# receivers that have it) and ``created_at``. Never a secret nor a secret id.


def event_document(event: Event, now: dt.datetime) -> dict[str, Any]:
    """The document an event is written to the outbox as, due at once."""
    return {
        "_id": event.id,
        "type": event.type,
        "at": event.at,
        "payload": event_body(event),
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


def insert_events(
    collection: Collection[dict[str, Any]],
    events: Sequence[Event],
    now: dt.datetime | None = None,
) -> None:
    """Write ``events`` to the outbox ``collection`` in one unordered ``insert_many``, due
    at once (``now``, by default the store's clock, is their ``created_at``). An event id
    already stored is a retry whose first attempt landed: ignored. Any other refusal is
    raised (WriteError), as is a write concern not met. Nothing is sent for no events."""
    if not events:
        return
    stamp = utc_now() if now is None else now
    try:
        collection.insert_many([event_document(e, stamp) for e in events], ordered=False)
    except BulkWriteError as exc:
        if exc.details.get("writeConcernErrors"):
            raise WriteConcernError("write concern not satisfied") from None
        for error in exc.details.get("writeErrors", []):
            if error.get("code") != DUPLICATE_KEY:
                raise WriteError(error.get("errmsg"), error.get("code")) from None


def pending_of(doc: Mapping[str, Any]) -> PendingEvent:
    """The outbox document as the deliverer gets it; ValueError, TypeError or KeyError when
    it is malformed."""
    payload = doc["payload"]
    data = json.loads(payload).get("data")
    if not isinstance(data, dict):
        raise ValueError("an outbox event's payload is malformed")
    delivered = doc.get("delivered") or []
    return PendingEvent(
        Event(str(doc["type"]), aware(doc["at"]), data, str(doc["_id"])),
        payload,
        int(doc.get("attempts", 0)),
        aware(doc["created_at"]),
        frozenset(str(digest) for digest in delivered),
    )


MALFORMED_EVENT = (KeyError, TypeError, ValueError, AttributeError)  # what pending_of raises


def aware(value: Any) -> dt.datetime:
    """A stored time as an aware UTC datetime (a client without tz_aware reads naive ones);
    TypeError when it is no time."""
    if not isinstance(value, dt.datetime):
        raise TypeError("not a stored time")
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
