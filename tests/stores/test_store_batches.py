"""Both stores group concurrent creates, fetches and audit inserts, and still answer each
request alone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.conftest import RawRecords, audit_record, id_of, on_store, read_back, stored_record
from vault.errors import CorruptRecord, StoreUnavailable
from vault.records import SealedSecret
from vault.stores.base import SecretStore


def record(secret_id: str | None = None) -> SealedSecret:
    return stored_record(secret_id)


def store_calls(operation: str) -> float:
    value = REGISTRY.get_sample_value("vault_store_batch_size_count", {"operation": operation})
    return value or 0.0


def test_concurrent_creates_and_fetches_share_calls_and_get_their_own_records(
    store_env: dict[str, str],
) -> None:
    records = [record() for _ in range(64)]
    unknown = [str(uuid.uuid4()) for _ in range(8)]

    async def work(store: SecretStore) -> None:
        inserts_before = store_calls("insert")
        await asyncio.gather(*(store.insert(r) for r in records))
        assert store_calls("insert") - inserts_before < len(records)

        reads_before = store_calls("read")
        wanted = [id_of(r) for r in records] + unknown + [id_of(records[0])] * 4
        found = await asyncio.gather(*(read_back(store, secret_id) for secret_id in wanted))
        assert store_calls("read") - reads_before < len(wanted)
        assert found[: len(records)] == records
        assert found[len(records) : len(records) + len(unknown)] == [None] * len(unknown)
        assert found[-4:] == [records[0]] * 4

    on_store(store_env, work)


def test_a_conflicting_insert_fails_alone_and_its_batch_mates_are_stored(
    store_env: dict[str, str],
) -> None:
    taken = record()
    others = [record() for _ in range(10)]

    async def work(store: SecretStore) -> None:
        await store.insert(taken)
        results = await asyncio.gather(
            *(store.insert(r) for r in [*others[:5], record(id_of(taken)), *others[5:]]),
            return_exceptions=True,
        )
        assert [isinstance(r, Exception) for r in results] == [False] * 5 + [True] + [False] * 5
        assert await read_back(store, id_of(taken)) == taken  # the first record is untouched
        assert await asyncio.gather(*(read_back(store, id_of(r)) for r in others)) == others

    on_store(store_env, work)


@pytest.mark.parametrize("store_kind", ["mongo"], indirect=True)
def test_an_insert_retried_after_it_landed_counts_as_stored(store_env: dict[str, str]) -> None:
    # pymongo retries a write whose answer was lost; the retry finds the record it wrote.
    same = record()

    async def work(store: SecretStore) -> None:
        await store.insert(same)
        await asyncio.gather(store.insert(same), store.insert(record()))
        assert await read_back(store, id_of(same)) == same

    on_store(store_env, work)


@pytest.mark.parametrize("store_kind", ["mongo"], indirect=True)
def test_a_malformed_record_fails_only_its_own_fetch(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    # Records edited outside the service: one lost its key id, one has text for a nonce.
    records = [record() for _ in range(12)]
    missing_kid, text_nonce = records[3], records[7]

    async def work(store: SecretStore) -> None:
        await asyncio.gather(*(store.insert(r) for r in records))
        collection = raw_records._mongo()
        collection.update_one({"_id": missing_kid.record_key}, {"$unset": {"kid": ""}})
        collection.update_one({"_id": text_nonce.record_key}, {"$set": {"nonce": 12}})

        found = await asyncio.gather(
            *(read_back(store, id_of(r)) for r in records), return_exceptions=True
        )
        for index, (wanted, got) in enumerate(zip(records, found, strict=True)):
            if wanted in (missing_kid, text_nonce):
                assert isinstance(got, CorruptRecord), index
                assert id_of(wanted) not in str(got)
                assert wanted.record_key not in str(got)
            else:
                assert got == wanted, index

    on_store(store_env, work)


def test_concurrent_audit_inserts_share_calls_and_a_malformed_one_is_refused_alone(
    store_env: dict[str, str],
) -> None:
    # One record made outside the middleware's types (no op, a record_id that is no hex:
    # SQLite's NOT NULL and MongoDB's ObjectId each refuse one) is refused by itself, as a
    # value (not worth retrying), and the others are stored.
    documents = [audit_record(f"r{i}") for i in range(32)]
    malformed = dataclasses.replace(audit_record("bad"), op=None, record_id="zz")  # type: ignore[arg-type]

    async def work(store: SecretStore) -> None:
        calls_before = store_calls("insert_audit")
        results = await asyncio.gather(
            *(store.insert_audit(d) for d in [*documents[:16], malformed, *documents[16:]])
        )
        assert store_calls("insert_audit") - calls_before < len(documents)
        assert [result is None for result in results] == [True] * 16 + [False] + [True] * 16
        assert isinstance(results[16], Exception)

    on_store(store_env, work)


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
def test_an_audit_write_that_fails_as_a_whole_raises_store_unavailable(
    store_env: dict[str, str],
) -> None:
    # What a writer retries: the store failed the call, not this record.
    async def work(store: SecretStore) -> None:
        db = Path(store_env["DATA_DIR"]) / "vault.db"
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("DROP TABLE audit")
        with pytest.raises(StoreUnavailable):
            await store.insert_audit(audit_record("r1"))

    on_store(store_env, work)
