"""The outbox of lifecycle events in both stores, on real stores: written in the caller's
transaction or batch, claimed under a lease that one deliverer at a time holds, settled
only by the lease's holder, and counted."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pymongo
import pytest

from tests.conftest import MongoWireServer, on_store, write_legacy
from vault.backend import backend_for
from vault.events import CREATED, READ, Event, PendingEvent, event_body
from vault.settings import Settings
from vault.stores.base import SecretStore
from vault.stores.mongo.documents import insert_events as insert_documents
from vault.stores.sqlite.connection import SCHEMA, connect, migrate
from vault.stores.sqlite.documents import insert_events as insert_rows

LEASE = 30.0


def event(kind: str = READ, **data: Any) -> Event:
    return Event(kind, dt.datetime.now(dt.UTC), {"label": "deploy token", **data})


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def same(claimed: PendingEvent, made: Event) -> bool:
    """The event as made, its time as the store keeps it (MongoDB: to the millisecond)."""
    got = claimed.event
    close = abs(got.at - made.at) < dt.timedelta(milliseconds=1)
    return (got.id, got.type, got.data) == (made.id, made.type, made.data) and close


def test_a_claim_leases_the_due_events_to_one_deliverer(store_env: dict[str, str]) -> None:
    events = [event(CREATED), event(READ, reads_left=2)]

    async def work(store: SecretStore) -> None:
        assert await store.claim_events("a", now(), LEASE, 10) == []  # empty: nothing due
        await store.add_events(events)
        claimed = await store.claim_events("a", now(), LEASE, 10)
        assert len(claimed) == 2
        by_id = {p.event.id: p for p in claimed}
        assert all(same(by_id[e.id], e) for e in events)  # each whole
        assert all(by_id[e.id].body == event_body(e) for e in events)
        assert all(p.attempts == 0 and p.delivered_to == frozenset() for p in claimed)
        assert await store.claim_events("b", now(), LEASE, 10) == []  # leased to "a"
        count, oldest = await store.outbox_backlog(now())
        assert count == 2 and oldest is not None and oldest <= now()
        assert await store.event_delivered(events[0].id, "b") is False  # not b's lease
        assert await store.event_delivered(events[0].id, "a") is True
        assert await store.drop_event(events[1].id, "a") is True
        assert await store.drop_event(events[1].id, "a") is False  # gone already
        assert await store.outbox_backlog(now()) == (0, None)

    on_store(store_env, work)


def test_an_event_id_already_stored_is_a_retry_and_no_events_write_nothing(
    store_env: dict[str, str],
) -> None:
    first = event()

    async def work(store: SecretStore) -> None:
        await store.add_events([])
        assert await store.outbox_backlog(now()) == (0, None)
        await store.add_events([first])
        await store.add_events([first, event()])  # the retry of a write that landed
        assert (await store.outbox_backlog(now()))[0] == 2
        claimed = await store.claim_events("a", now(), LEASE, 10)
        assert len(claimed) == 2 and first.id in {p.event.id for p in claimed}

    on_store(store_env, work)


def test_a_failed_delivery_counts_the_attempt_and_is_due_again_later(
    store_env: dict[str, str],
) -> None:
    pending = event()

    async def work(store: SecretStore) -> None:
        await store.add_events([pending])
        [claimed] = await store.claim_events("a", now(), LEASE, 10)
        later = now() + dt.timedelta(seconds=60)
        assert await store.event_failed(pending.id, "b", later, {"r1"}) is False  # not b's
        assert await store.event_failed(pending.id, "a", later, {"r1"}) is True
        assert await store.claim_events("b", now(), LEASE, 10) == []  # not due yet
        [again] = await store.claim_events("b", later + dt.timedelta(seconds=1), LEASE, 10)
        assert (again.attempts, again.delivered_to) == (1, frozenset({"r1"}))
        assert again.body == claimed.body  # the same bytes to sign and send
        assert same(again, pending)

    on_store(store_env, work)


def test_settlements_made_together_apply_each_only_under_its_owners_lease(
    store_env: dict[str, str],
) -> None:
    """Outcomes submitted at once share one batch (on MongoDB one bulk write): each is
    applied, and answered, as if alone."""
    events = [event(n=n) for n in range(5)]

    async def work(store: SecretStore) -> None:
        await store.add_events(events)
        assert len(await store.claim_events("a", now(), LEASE, 10)) == 5
        assert await store.event_delivered(events[4].id, "a") is True  # gone before the batch
        later = now() + dt.timedelta(seconds=120)
        answers = await asyncio.gather(
            store.event_delivered(events[0].id, "a"),
            store.event_failed(events[1].id, "a", later, {"r1"}),
            store.event_delivered(events[2].id, "b"),  # not b's lease
            store.event_failed(events[3].id, "b", later),  # not b's either
            store.drop_event(events[4].id, "a"),  # gone already
        )
        assert answers == [True, True, False, False, False]
        assert (await store.outbox_backlog(now()))[0] == 3
        # events[2] and [3] are still a's, due again only when a's lease ends
        taken = await store.claim_events("c", now() + dt.timedelta(seconds=LEASE + 1), 600.0, 10)
        assert sorted(p.event.id for p in taken) == sorted(e.id for e in events[2:4])
        [again] = await store.claim_events("d", later + dt.timedelta(seconds=1), LEASE, 10)
        assert (again.event.id, again.attempts, again.delivered_to) == (
            events[1].id, 1, frozenset({"r1"}),
        )  # fmt: skip

    on_store(store_env, work)


def test_an_expired_lease_lets_another_deliverer_claim_and_the_first_settle_nothing(
    store_env: dict[str, str],
) -> None:
    pending = event()

    async def work(store: SecretStore) -> None:
        await store.add_events([pending])
        start = now()
        assert len(await store.claim_events("a", start, 5.0, 10)) == 1
        assert await store.claim_events("b", start + dt.timedelta(seconds=4), 5.0, 10) == []
        # "a" died, or hangs: its lease ends and "b" takes the event over.
        taken = await store.claim_events("b", start + dt.timedelta(seconds=6), 5.0, 10)
        assert [p.event.id for p in taken] == [pending.id]
        assert await store.event_delivered(pending.id, "a") is False
        assert await store.event_delivered(pending.id, "b") is True

    on_store(store_env, work)


@pytest.mark.parametrize("limit", [4, 1])  # a batch, and a probe's single event
def test_deliverers_on_two_stores_racing_never_claim_one_event_twice(
    store_env: dict[str, str], limit: int
) -> None:
    """Two store objects on one database (two processes' worth), claiming at once in small
    batches: every event is claimed, each exactly once."""
    events = [event(n=n) for n in range(60)]

    async def main() -> list[list[str]]:
        stores = [backend_for(Settings.from_env(store_env)).open() for _ in range(2)]
        for store in stores:
            await store.open()
        try:
            await stores[0].add_events(events)

            async def drain(store: SecretStore, owner: str) -> list[str]:
                got: list[str] = []
                while claimed := await store.claim_events(owner, now(), LEASE, limit):
                    got += [p.event.id for p in claimed]
                return got

            return list(await asyncio.gather(*(drain(s, f"d{k}") for k, s in enumerate(stores))))
        finally:
            for store in stores:
                await store.close()

    first, second = asyncio.run(main())
    assert sorted(first + second) == sorted(e.id for e in events)
    assert not set(first) & set(second)


def test_the_sqlite_helper_writes_in_the_callers_transaction(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    path.touch()
    conn = connect(path, 2.0)
    conn.executescript(SCHEMA)
    migrate(conn)
    before = conn.total_changes
    insert_rows(conn, [])  # nothing at all is run
    assert conn.total_changes == before
    kept, undone = event(), event()
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        insert_rows(conn, [kept])
        insert_rows(conn, [kept])  # a retry: ignored, the transaction goes on
    with contextlib.suppress(RuntimeError), conn:
        conn.execute("BEGIN IMMEDIATE")
        insert_rows(conn, [undone])
        raise RuntimeError("the change failed: its events go with it")
    ids = [row[0] for row in conn.execute("SELECT event_id FROM outbox")]
    assert ids == [kept.id]
    conn.close()


def test_the_mongo_helper_ignores_a_retry_and_sends_nothing_for_no_events(mongo_uri: str) -> None:
    with pymongo.MongoClient(mongo_uri, tz_aware=True) as client:
        db = client["t" + uuid.uuid4().hex[:16]]
        outbox = db["outbox"]
        insert_documents(outbox, [])
        assert "outbox" not in db.list_collection_names()  # not even made
        first, second = event(), event()
        insert_documents(outbox, [first])
        insert_documents(outbox, [first, second])  # the retry of a batch that landed
        assert sorted(doc["_id"] for doc in outbox.find()) == sorted([first.id, second.id])
        stored = outbox.find_one({"_id": first.id})
        assert stored is not None and stored["payload"] == event_body(first)


def test_a_file_from_before_the_outbox_gets_one(tmp_path: Path, master_key: str) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    write_legacy(env, [])  # the earliest schema: a secrets table only
    pending = event()

    async def work(store: SecretStore) -> list[PendingEvent]:
        await store.add_events([pending])
        return await store.claim_events("a", now(), LEASE, 1)

    [claimed] = on_store(env, work)
    assert claimed.event == pending
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "vault.db")) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT 1 FROM outbox WHERE next_attempt_at <= ? LIMIT 1", ("x",)
        ).fetchall()
    assert any("outbox_due" in str(row) for row in plan)


@pytest.mark.parametrize("limit", [0, -1])
def test_a_claim_of_nothing_asks_nothing(store_env: dict[str, str], limit: int) -> None:
    async def work(store: SecretStore) -> list[PendingEvent]:
        await store.add_events([event()])
        return await store.claim_events("a", now(), LEASE, limit)

    assert on_store(store_env, work) == []


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


BACKLOG = 4000  # events waiting, as a receiver down for a few minutes under load leaves


def test_a_large_mongodb_backlog_is_counted_without_reading_it(
    own_mongo: MongoWireServer, master_key: str
) -> None:
    """The backlog gauges, refreshed every few seconds by every process, cost the database
    about the same with thousands of events waiting as with none: counting them by reading
    each (count_documents) held nx-27017 for ~75 ms a call at this size, stalling the
    requests queued behind it."""
    # A budget for the insert of thousands of events on a busy machine: what is measured
    # is the count after it.
    env = {
        "MASTER_KEY": master_key,
        "MONGO_URI": own_mongo.uri,
        "MONGO_DB": "backlog",
        "STORE_TIMEOUT_SECONDS": "60",
    }
    events = [event(n=n) for n in range(BACKLOG)]
    assert own_mongo.process is not None
    pid = own_mongo.process.pid

    async def work(store: SecretStore) -> tuple[float, int, dt.datetime | None]:
        await store.add_events(events)
        await store.outbox_backlog(now())  # the indexes made
        before = cpu_seconds(pid)
        for _ in range(20):
            count, oldest = await store.outbox_backlog(now())
        return cpu_seconds(pid) - before, count, oldest

    spent, count, oldest = on_store(env, work)
    assert count == BACKLOG and oldest is not None and oldest <= now()
    assert spent < 0.2, f"{spent * 1000 / 20:.0f} ms of the database's CPU a count"


def test_a_probes_claim_from_a_large_mongodb_backlog_reads_only_what_it_claims(
    own_mongo: MongoWireServer, master_key: str
) -> None:
    """A claim of one event (while every receiver is known down, the deliverer claims one a
    second to probe them with) costs the database about the same with thousands of events
    due as with a few: the batch's query read every due event on nx-27017 (~35 ms of its
    CPU a claim at this size), stalling the requests queued behind it."""
    env = {
        "MASTER_KEY": master_key,
        "MONGO_URI": own_mongo.uri,
        "MONGO_DB": "claims",
        "STORE_TIMEOUT_SECONDS": "60",
    }
    events = [event(n=n) for n in range(BACKLOG)]
    assert own_mongo.process is not None
    pid = own_mongo.process.pid

    async def work(store: SecretStore) -> tuple[float, list[str]]:
        await store.add_events(events)
        claimed = [p.event.id for p in await store.claim_events("a", now(), LEASE, 1)]
        before = cpu_seconds(pid)
        for _ in range(20):
            claimed += [p.event.id for p in await store.claim_events("a", now(), LEASE, 1)]
        return cpu_seconds(pid) - before, claimed

    spent, claimed = on_store(env, work)
    assert claimed == [e.id for e in events[:21]]  # the oldest first, each once
    assert spent < 0.3, f"{spent * 1000 / 20:.0f} ms of the database's CPU a claim"
