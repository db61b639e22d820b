"""Both stores' ``unknown_key_counts``, the key guard's question: which key ids outside the
keyring seal live records, and how many each, found through the key id index."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pymongo
import pytest

from tests.conftest import free_port, on_store, stored_record
from vault.errors import StoreUnavailable
from vault.records import SealedSecret
from vault.stores.base import SecretStore
from vault.stores.sqlite import COUNT_LIVE_BY_KEY_ID, NEXT_KEY_ID

KNOWN = "00000000000000aa"
LOST = "00000000000000bb"
OTHER = "00000000000000cc"
GONE = "00000000000000dd"  # seals only records that are expired or used up


def record(key_id: str, *, keyed_by_id: bool = False, **lifecycle: Any) -> SealedSecret:
    """A record keyed by the digest of its id, or (``keyed_by_id``) by the id itself, as the
    previous version stored records (a legacy record, until rewrap converts it)."""
    if keyed_by_id:
        return SealedSecret(str(uuid.uuid4()), key_id, os.urandom(12), os.urandom(24), **lifecycle)
    return stored_record(key_id=key_id, ciphertext=os.urandom(24), **lifecycle)


def test_counts_the_live_records_of_each_key_id_outside_the_keyring(
    store_env: dict[str, str],
) -> None:
    now = dt.datetime.now(dt.UTC)
    past, future = now - dt.timedelta(minutes=5), now + dt.timedelta(hours=1)
    records = [
        *(record(KNOWN) for _ in range(3)),
        record(LOST),
        record(LOST, expires_at=future),
        record(LOST, reads_left=2),
        record(LOST, keyed_by_id=True),  # both forms of record are counted alike
        record(LOST, keyed_by_id=True, expires_at=past),
        record(LOST, expires_at=past),  # expired: not counted
        record(LOST, reads_left=0),  # used up: not counted
        record(OTHER, expires_at=future, reads_left=1),
        record(GONE, expires_at=past),
        record(GONE, reads_left=0),
    ]

    async def work(store: SecretStore) -> tuple[dict[str, int], ...]:
        empty = await store.unknown_key_counts([KNOWN])
        for r in records:
            await store.insert(r)
        return (
            empty,
            await store.unknown_key_counts([KNOWN]),
            await store.unknown_key_counts([KNOWN, LOST, OTHER]),
            await store.unknown_key_counts([]),
        )

    empty, unknown, none, all_ids = on_store(store_env, work)

    assert empty == {}
    assert unknown == {LOST: 4, OTHER: 1}
    assert none == {}
    assert all_ids == {KNOWN: 3, LOST: 4, OTHER: 1}


def test_sqlite_finds_the_key_ids_and_counts_through_the_key_id_index(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path)}
    on_store(env, lambda store: store.insert(record(LOST)))
    with sqlite3.connect(tmp_path / "vault.db") as conn:
        next_plan = " ".join(
            row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + NEXT_KEY_ID, ("",))
        )
        count_plan = " ".join(
            row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + COUNT_LIVE_BY_KEY_ID, (LOST, 0))
        )
    # A seek into the index for each distinct id (no sort, no scan of the table) ...
    assert next_plan == "SEARCH secrets USING COVERING INDEX secrets_key_id (key_id>?)"
    # ... and a count that visits only the records of that one id.
    assert count_plan.startswith("SEARCH secrets USING INDEX secrets_key_id (key_id=?)")


def test_mongo_builds_the_key_id_index_the_guard_relies_on(mongo_uri: str) -> None:
    store_env = {"MONGO_URI": mongo_uri, "MONGO_DB": "t" + uuid.uuid4().hex[:16]}
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(store_env["MONGO_URI"])
    collection = client[store_env["MONGO_DB"]]["secrets"]

    def kid_indexes() -> list[str]:
        return [
            name
            for name, info in collection.index_information().items()
            if [field for field, _ in info["key"]] == ["kid"]
        ]

    try:
        on_store(store_env, lambda store: store.insert(record(LOST)))
        assert kid_indexes() == []
        assert on_store(store_env, lambda store: store.unknown_key_counts([KNOWN])) == {LOST: 1}
        assert len(kid_indexes()) == 1
        # Made once: a second store (a restart, another replica) finds it and adds none.
        assert on_store(store_env, lambda store: store.unknown_key_counts([KNOWN])) == {LOST: 1}
        assert len(kid_indexes()) == 1
    finally:
        client.close()


def test_an_unreachable_database_is_store_unavailable_within_its_timeout() -> None:
    port = free_port()  # nothing listens there
    env = {"MONGO_URI": f"mongodb://127.0.0.1:{port}/", "STORE_TIMEOUT_SECONDS": "1"}
    started = dt.datetime.now(dt.UTC)
    with pytest.raises(StoreUnavailable):
        on_store(env, lambda store: store.unknown_key_counts([KNOWN]))
    # The index build's long budget never applies to finding the database gone.
    assert (dt.datetime.now(dt.UTC) - started).total_seconds() < 6
