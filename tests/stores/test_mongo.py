"""vault/stores/mongo/ against a MongoDB-wire server that goes away and comes back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest
from starlette.testclient import TestClient

from middleware.audit import AuditWriter
from tests.conftest import MongoWireServer, audit_record, b64, read_back, wait_until
from vault.app import create_app
from vault.crypto import generate_key
from vault.errors import StoreUnavailable
from vault.records import SealedSecret, record_key
from vault.settings import Settings
from vault.stores.mongo import MongoStore


@pytest.fixture
def outage_client(own_mongo: MongoWireServer, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings.from_env(
        {
            "MASTER_KEY": generate_key(),
            "MONGO_URI": own_mongo.uri,
            "MONGO_DB": "outage",
            "STORE_TIMEOUT_SECONDS": "4",
        }
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_a_store_whose_database_is_down_closes_in_seconds(own_mongo: MongoWireServer) -> None:
    """Shutting down during an outage: pymongo's close() alone waits 30 s to end sessions."""
    store = MongoStore(own_mongo.uri, "closing", timeout=1.0, max_secret_bytes=65536)

    async def main() -> float:
        await store.open()
        # Served for a while: the client's pool holds server sessions to end at close.
        await asyncio.gather(*(read_back(store, str(uuid.uuid4())) for _ in range(8)), store.ping())
        own_mongo.stop()
        with pytest.raises(StoreUnavailable):
            await store.ping()
        started = time.monotonic()
        await store.close()
        return time.monotonic() - started

    assert asyncio.run(main()) < 5


def test_once_the_database_is_known_down_every_call_fails_at_once_audit_writes_too(
    own_mongo: MongoWireServer,
) -> None:
    """The breaker: after one connection-level failure secret and audit calls raise
    StoreUnavailable without trying the database, until a probe finds it back."""
    store = MongoStore(own_mongo.uri, "breaker_calls", timeout=2.0, max_secret_bytes=65536)

    async def main() -> tuple[float, float]:
        await store.open()
        try:
            stored = SealedSecret(record_key("a" * 32), "k1", bytes(12), b"ct")
            await store.insert(stored)
            # A refusal of one record is an answer: the database is up, nothing opens.
            clash = SealedSecret(record_key("a" * 32), "k1", bytes(12), b"other")
            with pytest.raises(pymongo.errors.WriteError):
                await store.insert(clash)
            assert await read_back(store, "a" * 32) == stored

            own_mongo.stop()
            with pytest.raises(StoreUnavailable):
                await read_back(store, "a" * 32)  # the first failure: pymongo's own time
            started = time.monotonic()
            for _ in range(20):
                with pytest.raises(StoreUnavailable):
                    await read_back(store, "a" * 32)
                with pytest.raises(StoreUnavailable):
                    await store.insert_audit(audit_record("during"))
                with pytest.raises(StoreUnavailable):
                    await store.delete("a" * 32)
            refused_in = time.monotonic() - started

            own_mongo.start()
            back = time.monotonic()
            while True:  # each try is either refused at once or the probe
                try:
                    found = await read_back(store, "a" * 32)
                    break
                except StoreUnavailable:
                    assert time.monotonic() - back < 10, "the store never came back"
                    await asyncio.sleep(0.05)
            assert found == stored
            return refused_in, time.monotonic() - back
        finally:
            await store.close()

    refused_in, recovered_in = asyncio.run(main())
    assert refused_in < 2.0  # 60 calls; each alone would have taken the 2 s budget
    assert recovered_in < 5.0


def test_async_audit_records_wait_out_an_outage_and_land_once(own_mongo: MongoWireServer) -> None:
    """A write the database failed as a whole is StoreUnavailable, which the async writer
    retries: records made during an outage are stored once it is over, none twice."""
    store = MongoStore(own_mongo.uri, "audit_outage", timeout=1.0, max_secret_bytes=65536)

    async def main() -> None:
        await store.open()
        writer = AuditWriter(store.insert_audit, wait=False, retry_delay=0.2)
        await writer.start()
        try:
            await writer.write(audit_record("before"))
            own_mongo.stop()
            with pytest.raises(StoreUnavailable):
                await store.insert_audit(audit_record("direct"))
            for i in range(5):
                await writer.write(audit_record(f"during-{i}"))
            await asyncio.sleep(1.5)  # several attempts fail meanwhile
            own_mongo.start()
            await asyncio.sleep(3)  # the next attempts find the database back
        finally:
            await writer.close()
            await store.close()

    asyncio.run(main())
    with pymongo.MongoClient(own_mongo.uri) as client:
        stored = [doc["request_id"] for doc in client["audit_outage"]["audit"].find()]
    assert sorted(stored) == ["before", *(f"during-{i}" for i in range(5))]


def timed_post(client: TestClient, path: str, payload: dict[str, str]) -> tuple[int, float, dict]:  # type: ignore[type-arg]
    started = time.monotonic()
    response = client.post(path, json=payload)
    return response.status_code, time.monotonic() - started, dict(response.headers)


def test_database_down_gives_fast_503_and_recovers_without_restart(
    outage_client: TestClient, own_mongo: MongoWireServer
) -> None:
    client = outage_client
    stored = client.post("/vault/secret/create", json={"secret": b64(b"before")}).json()
    secret_id = stored["secret_id"]

    own_mongo.stop()
    for path, payload in (
        ("/vault/secret/create", {"secret": b64(b"during")}),
        ("/vault/secret/fetch", {"secret_id": secret_id}),
    ):
        status, elapsed, headers = timed_post(client, path, payload)
        assert status == 503
        assert headers["retry-after"] == "5"  # RETRY_AFTER_SECONDS
        assert elapsed < 5
    started = time.monotonic()
    assert client.get("/readyz").status_code == 503
    assert time.monotonic() - started < 3.5  # probes have short timeouts of their own
    assert client.get("/healthz").status_code == 200

    own_mongo.start()
    wait_until(lambda: client.get("/readyz").status_code == 200, 15, "readiness to return")
    fetched = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
    assert fetched.json() == {"secret": b64(b"before")}
    assert client.post("/vault/secret/create", json={"secret": b64(b"after")}).status_code == 200


def test_a_hung_database_still_answers_503_within_seconds(
    outage_client: TestClient, own_mongo: MongoWireServer
) -> None:
    client = outage_client
    secret_id = client.post("/vault/secret/create", json={"secret": b64(b"x")}).json()["secret_id"]
    own_mongo.pause()  # connections stay open; nothing answers
    try:
        status, elapsed, _ = timed_post(client, "/vault/secret/fetch", {"secret_id": secret_id})
        assert status == 503
        assert elapsed < 5
        assert client.get("/readyz").status_code == 503
    finally:
        own_mongo.resume()
    wait_until(lambda: client.get("/readyz").status_code == 200, 15, "readiness to return")
    assert client.post("/vault/secret/fetch", json={"secret_id": secret_id}).status_code == 200


def test_acknowledged_secrets_survive_a_database_crash(
    outage_client: TestClient, own_mongo: MongoWireServer
) -> None:
    import signal

    client = outage_client
    secrets = {
        client.post("/vault/secret/create", json={"secret": b64(bytes([i]) * 10)}).json()[
            "secret_id"
        ]: bytes([i]) * 10
        for i in range(20)
    }
    own_mongo.stop(signal.SIGKILL)
    own_mongo.start()
    wait_until(lambda: client.get("/readyz").status_code == 200, 15, "readiness to return")
    for secret_id, data in secrets.items():
        response = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
        assert response.json() == {"secret": b64(data)}


def test_unknown_database_id_is_404_not_an_error(outage_client: TestClient) -> None:
    response = outage_client.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
    assert response.status_code == 404
