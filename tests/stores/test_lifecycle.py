"""Both stores keep a secret's expiry and read limit, take reads exactly, and remove what
is deleted, used up or expired: the row or document is gone, not flagged."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import uuid

from tests.conftest import RawRecords, id_of, on_store, read_back, stored_record
from vault.records import SealedSecret
from vault.stores.base import DeleteResult, SecretStore


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
