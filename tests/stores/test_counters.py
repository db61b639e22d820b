"""vault/stores/counters.py against the MongoDB-wire server: one limit for every replica."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx2 as httpx
import pymongo
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from middleware.ratelimit import RateLimitMiddleware
from tests.conftest import MongoWireServer, free_port
from vault.errors import StoreUnavailable
from vault.stores.counters import MongoCounter

pytestmark = pytest.mark.anyio

Database = tuple[str, pymongo.MongoClient[dict[str, Any]]]
MakeCounter = Callable[..., MongoCounter]
LATER = float(int(time.time()) + 3600)


@pytest.fixture
def database(mongo_uri: str) -> Iterator[Database]:
    """A fresh database name on the shared server, and a client to look inside it."""
    name = "rl" + uuid.uuid4().hex[:16]
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri, tz_aware=True)
    yield name, client
    client.drop_database(name)
    client.close()


@pytest.fixture
async def counters(mongo_uri: str, database: Database) -> AsyncIterator[MakeCounter]:
    """``make(**options)`` → an opened MongoCounter on this test's database, closed after."""
    async with AsyncExitStack() as stack:
        pending: list[MongoCounter] = []

        def make(**options: Any) -> MongoCounter:
            options.setdefault("database", database[0])
            counter = MongoCounter(mongo_uri, **options)
            pending.append(counter)
            return counter

        async def open_all() -> None:
            for counter in pending:
                await counter.open()
                stack.push_async_callback(counter.close)
            pending.clear()

        make.open_all = open_all  # type: ignore[attr-defined]
        yield make


async def opened(make: MakeCounter, **options: Any) -> MongoCounter:
    counter = make(**options)
    await make.open_all()  # type: ignore[attr-defined]
    return counter


async def test_counts_up_per_key_and_stores_the_expiry(
    counters: MakeCounter, database: Database
) -> None:
    counter = await opened(counters)
    assert [await counter.increment("198.51.100.1:60:7", LATER) for _ in range(3)] == [1, 2, 3]
    assert await counter.increment("198.51.100.2:60:7", LATER) == 1

    name, client = database
    doc = client[name]["rate_limits"].find_one({"_id": "198.51.100.1:60:7"})
    assert doc is not None
    assert doc["n"] == 3
    assert doc["expires_at"] == dt.datetime.fromtimestamp(LATER, dt.UTC)


async def test_a_key_stored_with_another_expiry_keeps_counting(counters: MakeCounter) -> None:
    counter = await opened(counters)
    assert await counter.increment("198.51.100.1:60:7", LATER) == 1
    assert await counter.increment("198.51.100.1:60:7", LATER + 60) == 2


@pytest.mark.parametrize("replicas", [1, 2])
async def test_concurrent_increments_are_never_lost(
    counters: MakeCounter, database: Database, replicas: int
) -> None:
    # Eight worker threads in all, split over one or two counters (as over two replicas),
    # all racing to create and then bump one key.
    instances = [counters(pool_size=8 // replicas) for _ in range(replicas)]
    await counters.open_all()  # type: ignore[attr-defined]
    results: list[int] = []

    async def hit(counter: MongoCounter) -> None:
        results.append(await counter.increment("203.0.113.7:3600:1", LATER))

    async with anyio.create_task_group() as group:
        for n in range(200):
            group.start_soon(hit, instances[n % replicas])

    assert sorted(results) == list(range(1, 201))
    name, client = database
    doc = client[name]["rate_limits"].find_one({"_id": "203.0.113.7:3600:1"})
    assert doc is not None and doc["n"] == 200


def counter_calls() -> float:
    value = REGISTRY.get_sample_value(
        "vault_store_batch_size_count", {"operation": "rate_limit_increment"}
    )
    return value or 0.0


async def test_concurrent_requests_share_calls_and_each_gets_its_own_counts(
    counters: MakeCounter,
) -> None:
    counter = await opened(counters)
    before = counter_calls()
    results: list[list[int]] = []

    async def request() -> None:
        # One request's two windows (a per-second and a per-minute limit) count together.
        results.append(await counter.increment_many([("ip:1:5", LATER), ("ip:60:9", LATER)]))

    async with anyio.create_task_group() as group:
        for _ in range(60):
            group.start_soon(request)

    assert sorted(r[0] for r in results) == list(range(1, 61))
    assert sorted(r[1] for r in results) == list(range(1, 61))
    assert counter_calls() - before < 30  # 60 requests, 120 increments, far fewer calls


async def test_open_creates_a_ttl_index_on_the_expiry(
    counters: MakeCounter, database: Database
) -> None:
    await opened(counters)
    name, client = database
    indexes = list(client[name]["rate_limits"].list_indexes())
    ttl = [i for i in indexes if dict(i["key"]) == {"expires_at": 1}]
    assert len(ttl) == 1
    assert ttl[0]["expireAfterSeconds"] == 0


async def test_unreachable_server_fails_fast_with_store_unavailable() -> None:
    counter = MongoCounter(f"mongodb://127.0.0.1:{free_port()}/", database="x", timeout=0.5)
    started = time.monotonic()
    await counter.open()  # best effort: a database down at start must not stop start-up
    assert time.monotonic() - started < 2.0
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await counter.increment("198.51.100.1:60:7", LATER)
        assert time.monotonic() - started < 2.0
    finally:
        await counter.close()


async def test_index_is_created_once_a_database_down_at_start_comes_back(
    own_mongo: MongoWireServer,
) -> None:
    own_mongo.stop()
    counter = MongoCounter(own_mongo.uri, database="late", timeout=1.0)
    await counter.open()
    try:
        with pytest.raises(StoreUnavailable):
            await counter.increment("k", LATER)
        own_mongo.start()
        with anyio.fail_after(15):
            while True:
                try:
                    # Not necessarily 1: an attempt that timed out may still have landed.
                    assert await counter.increment("k", LATER) >= 1
                    break
                except StoreUnavailable:
                    await anyio.sleep(0.2)
    finally:
        await counter.close()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(own_mongo.uri)
    try:
        keys = [dict(i["key"]) for i in client["late"]["rate_limits"].list_indexes()]
    finally:
        client.close()
    assert {"expires_at": 1} in keys


async def test_replicas_sharing_the_counter_enforce_one_limit(counters: MakeCounter) -> None:
    def replica(counter: MongoCounter) -> httpx.AsyncClient:
        app = Starlette(
            routes=[Route("/", lambda request: PlainTextResponse("ok"))],
            middleware=[Middleware(RateLimitMiddleware, limits=[(3, 3600)], counter=counter)],
        )
        transport = httpx.ASGITransport(app, client=("198.51.100.9", 4321))
        return httpx.AsyncClient(transport=transport, base_url="http://vault")

    one, other = counters(), counters()
    await counters.open_all()  # type: ignore[attr-defined]
    async with replica(one) as a, replica(other) as b:
        responses = [await a.get("/"), await b.get("/"), await a.get("/")]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert [r.headers["ratelimit-remaining"] for r in responses] == ["2", "1", "0"]
        refused = await b.get("/")
        assert refused.status_code == 429
        assert "at most 3 requests per hour" in refused.json()["detail"]
