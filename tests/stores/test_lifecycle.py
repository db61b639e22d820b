"""Both stores keep a secret's expiry and read limit, take reads exactly, and remove what
is deleted, used up or expired: the row or document is gone, not flagged."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import uuid
from typing import Any

import pytest

from tests.conftest import RawRecords, id_of, on_store, read_back, stored_record
from vault.records import SealedSecret, record_key
from vault.stores.base import DeleteResult, SecretStore
from vault.stores.mongo.documents import document


def record(*, expires_at: dt.datetime | None = None, reads_left: int | None = None) -> SealedSecret:
    return stored_record(expires_at=expires_at, reads_left=reads_left)


def whole_seconds(delta: dt.timedelta) -> dt.datetime:
    return (dt.datetime.now(dt.UTC) + delta).replace(microsecond=0)


def test_expiry_and_read_limit_are_stored_and_read_back(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    later = whole_seconds(dt.timedelta(hours=2))
    both, plain = record(expires_at=later, reads_left=3), record()

    async def work(store: SecretStore) -> None:
        await store.insert(both)
        await store.insert(plain)

    on_store(store_env, work)
    got_both, got_plain = raw_records.sealed(id_of(both)), raw_records.sealed(id_of(plain))
    assert got_plain is not None
    assert got_both == both
    assert got_plain == plain
    assert (got_plain.expires_at, got_plain.reads_left) == (None, None)


def test_concurrent_reads_take_exactly_the_limit_and_the_last_deletes(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    limited = record(reads_left=7)

    async def work(store: SecretStore) -> list[SealedSecret | None]:
        await store.insert(limited)
        return await asyncio.gather(*(read_back(store, id_of(limited)) for _ in range(40)))

    taken = [r for r in on_store(store_env, work) if r is not None]
    assert sorted(r.reads_left for r in taken) == [0, 1, 2, 3, 4, 5, 6]
    assert all(r.ciphertext == limited.ciphertext for r in taken)
    assert limited.record_key not in raw_records.record_keys()


def test_a_record_without_a_limit_is_read_without_being_consumed(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    plain = record()

    async def work(store: SecretStore) -> list[SealedSecret | None]:
        await store.insert(plain)
        return [await read_back(store, id_of(plain)) for _ in range(3)]

    assert on_store(store_env, work) == [plain] * 3
    assert raw_records.sealed(id_of(plain)) == plain


def test_delete_removes_the_record_and_says_what_it_found(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    kept, deleted = record(), record(reads_left=2)
    expired = record(expires_at=whole_seconds(dt.timedelta(seconds=-5)))

    async def work(store: SecretStore) -> list[DeleteResult]:
        for r in (kept, deleted, expired):
            await store.insert(r)
        return [
            await store.delete(id_of(deleted)),
            await store.delete(id_of(deleted)),
            await store.delete(id_of(expired)),
            await store.delete(str(uuid.uuid4())),
        ]

    assert on_store(store_env, work) == [
        DeleteResult.DELETED,
        DeleteResult.MISSING,
        DeleteResult.EXPIRED,
        DeleteResult.MISSING,
    ]
    assert raw_records.record_keys() == {kept.record_key}


def test_purge_removes_expired_records_and_keeps_the_rest(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    expired = [record(expires_at=whole_seconds(dt.timedelta(seconds=-1))) for _ in range(3)]
    living = [
        record(),
        record(expires_at=whole_seconds(dt.timedelta(hours=1))),
        record(reads_left=1),
    ]

    async def work(store: SecretStore) -> tuple[int, int]:
        for r in expired + living:
            await store.insert(r)
        return await store.purge_expired(), await store.purge_expired()

    assert on_store(store_env, work) == (3, 0)
    assert raw_records.record_keys() == {r.record_key for r in living}


def test_rewrap_never_resets_a_read_count_nor_brings_back_a_deleted_record(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    later = whole_seconds(dt.timedelta(hours=1))
    counted, gone = record(expires_at=later, reads_left=5), record(reads_left=5)

    async def work(store: SecretStore) -> tuple[bool, bool, SealedSecret | None]:
        await store.insert(counted)
        await store.insert(gone)
        # rewrap read both records, then requests read one and deleted the other ...
        await read_back(store, id_of(counted))
        await store.delete(id_of(gone))
        # ... before it wrote them back under the new key.
        swapped = await store.replace_sealed(counted, _resealed(counted))
        resurrected = await store.replace_sealed(gone, _resealed(gone))
        return swapped, resurrected, raw_records.sealed(id_of(counted))

    swapped, resurrected, after = on_store(store_env, work)
    assert (swapped, resurrected) == (True, False)
    assert after is not None
    assert (after.key_id, after.expires_at, after.reads_left) == ("fedcba9876543210", later, 4)
    assert raw_records.record_keys() == {counted.record_key}


def _resealed(old: SealedSecret) -> SealedSecret:
    return SealedSecret(
        record_key=old.record_key,
        key_id="fedcba9876543210",
        nonce=os.urandom(12),
        ciphertext=os.urandom(40),
    )


def test_a_record_stored_under_its_id_is_served_and_one_beside_its_digest_never_comes_back(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    # As an earlier version stored them: under the id itself (a legacy record). Two secrets
    # also have a converted record under their digest beside it (a conversion cut short).
    legacy_id, used_id, deleted_id = (str(uuid.uuid4()) for _ in range(3))
    legacy = dataclasses.replace(record(), record_key=legacy_id)
    used_old = dataclasses.replace(record(reads_left=5), record_key=used_id)
    used_new = stored_record(used_id, reads_left=2)
    deleted_old = dataclasses.replace(record(), record_key=deleted_id)
    deleted_new = stored_record(deleted_id)

    async def work(store: SecretStore) -> tuple[object, ...]:
        for r in (legacy, used_old, used_new, deleted_old, deleted_new):
            await store.insert(r)
        return (
            await read_back(store, legacy_id),
            [await read_back(store, used_id) for _ in range(3)],
            await read_back(store, deleted_id),
            await store.delete(deleted_id),
            await read_back(store, deleted_id),
        )

    found, reads, before_delete, deleted, after_delete = on_store(store_env, work)
    assert found == legacy
    # The digest's record wins; its last read removes the one under the id as well.
    assert reads == [
        dataclasses.replace(used_new, reads_left=1),
        dataclasses.replace(used_new, reads_left=0),
        None,
    ]
    assert before_delete == deleted_new
    assert (deleted, after_delete) == (DeleteResult.DELETED, None)
    assert raw_records.record_keys() == {legacy_id}


def legacy(secret_id: str, **lifecycle: Any) -> SealedSecret:
    """A record as an earlier version stored it: under its id (a legacy record)."""
    return dataclasses.replace(record(**lifecycle), record_key=secret_id)


def _converted(old: SealedSecret) -> SealedSecret:
    """What rewrap makes of a legacy record: sealed anew for its record key."""
    return SealedSecret(
        record_key=record_key(old.record_key),
        key_id="fedcba9876543210",
        nonce=os.urandom(12),
        ciphertext=os.urandom(40),
    )


def test_conversion_keeps_the_read_count_and_never_brings_back_a_deleted_record(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    later = whole_seconds(dt.timedelta(hours=1))
    counted_id, gone_id, changed_id = (str(uuid.uuid4()) for _ in range(3))
    counted = legacy(counted_id, expires_at=later, reads_left=5)
    gone, changed = legacy(gone_id, reads_left=5), legacy(changed_id)

    async def work(store: SecretStore) -> tuple[bool, bool, bool, SealedSecret | None]:
        for r in (counted, gone, changed):
            await store.insert(r)
        # rewrap read the three records, then requests read one and deleted another, and
        # the third was rewritten ...
        await read_back(store, counted_id)
        await store.delete(gone_id)
        stale = dataclasses.replace(changed, nonce=os.urandom(12))
        # ... before it moved them to their record keys.
        moved = await store.convert_sealed(counted, _converted(counted))
        resurrected = await store.convert_sealed(gone, _converted(gone))
        overwritten = await store.convert_sealed(stale, _converted(changed))
        return moved, resurrected, overwritten, raw_records.sealed(counted_id)

    moved, resurrected, overwritten, after = on_store(store_env, work)
    assert (moved, resurrected, overwritten) == (True, False, False)
    assert after is not None
    assert (after.key_id, after.expires_at, after.reads_left) == ("fedcba9876543210", later, 4)
    assert raw_records.record_keys() == {record_key(counted_id), changed_id}


def test_a_secret_stored_under_both_keys_converts_to_its_record_key_with_the_fewer_reads(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    # Imported under its record key beside the record an earlier version left under its id.
    secret_id = str(uuid.uuid4())
    old, imported = legacy(secret_id, reads_left=2), stored_record(secret_id, reads_left=4)

    async def work(store: SecretStore) -> bool:
        await store.insert(old)
        await store.insert(imported)
        return await store.convert_sealed(old, _converted(old))

    assert on_store(store_env, work) is True
    assert raw_records.record_keys() == {record_key(secret_id)}
    assert raw_records.sealed(secret_id) == dataclasses.replace(imported, reads_left=2)


@pytest.mark.parametrize("store_kind", ["mongo"], indirect=True)
def test_a_move_cut_short_is_finished_and_one_under_way_is_left_to_its_pass(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    # MongoDB moves a record in two writes: the converted document, then the old one's
    # delete. One pass stopped between them an hour ago, another is between them now.
    cut_id, busy_id = str(uuid.uuid4()), str(uuid.uuid4())
    cut, busy = legacy(cut_id, reads_left=5), legacy(busy_id)
    now = dt.datetime.now(dt.UTC)
    collection = raw_records._mongo()

    async def work(store: SecretStore) -> tuple[bool, bool]:
        await store.insert(cut)
        await store.insert(busy)
        for old, since in ((cut, now - dt.timedelta(hours=1)), (busy, now)):
            moving = {"since": since, "reads_left": old.reads_left}
            doc = document(dataclasses.replace(_converted(old), reads_left=old.reads_left), now)
            collection.insert_one({**doc, "moving": moving})
        # A read was taken from the old document after it was copied.
        collection.update_one({"_id": cut_id}, {"$inc": {"reads_left": -1}})
        return (
            await store.convert_sealed(cut, _converted(cut)),
            await store.convert_sealed(busy, _converted(busy)),
        )

    assert on_store(store_env, work) == (True, False)
    assert raw_records.record_keys() == {record_key(cut_id), record_key(busy_id), busy_id}
    finished = collection.find_one({"_id": record_key(cut_id)})
    assert finished["reads_left"] == 4 and "moving" not in finished
    assert "moving" in collection.find_one({"_id": record_key(busy_id)})
