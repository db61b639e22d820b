"""The audit log end to end, in the service's own store (both stores)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pymongo
import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from middleware.audit import AuditWriter
from tests.conftest import audit_record, b64, clean_env, on_store, wait_until
from vault.app import create_app
from vault.crypto import derive_audit_key, generate_key, secret_id_hmac
from vault.settings import Settings
from vault.stores.base import SecretStore
from vault.stores.sqlite import sqlite_timestamp


def audit_records(store_env: dict[str, str]) -> list[dict[str, Any]]:
    if "MONGO_URI" in store_env:
        with pymongo.MongoClient(store_env["MONGO_URI"], tz_aware=True) as client:
            docs = client[store_env["MONGO_DB"]]["audit"].find({}, {"_id": 0})
            return sorted(docs, key=lambda d: d["ts"])
    db = Path(store_env["DATA_DIR"]) / "vault.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM audit ORDER BY id").fetchall()
    return [dict(row) for row in rows]


def test_every_vault_request_is_recorded(client: TestClient, store_env: dict[str, str]) -> None:
    started = time.perf_counter()
    created = client.post(
        "/vault/secret/create", json={"secret": b64(b"x")}, headers={"User-Agent": "ua/1"}
    )
    secret_id = created.json()["secret_id"]
    client.post("/vault/secret/fetch/", json={"secret_id": secret_id})
    missing = str(uuid.uuid4())
    client.post("/vault/secret/fetch", json={"secret_id": missing})
    client.post("/vault/secret/create", content=b"nope")
    client.post("/vault/secret/create", content=b"x" * 200_000)
    client.post("/vault/secret/create", content=b"a=b", headers={"Content-Type": "text/plain"})
    client.get("/vault/secret/fetch")  # wrong method
    client.post("/vault/secret/list", json={})  # no such operation: probed, still recorded
    client.get("/healthz")  # not a /vault call: not audited
    elapsed_ms = (time.perf_counter() - started) * 1000

    records = audit_records(store_env)
    summary = [(r["op"], r["status"], r["outcome"]) for r in records]
    assert summary == [
        ("create", 200, "success"),
        ("fetch", 200, "success"),
        ("fetch", 404, "not_found"),
        ("create", 400, "invalid"),
        ("create", 413, "too_large"),
        ("create", 415, "invalid"),
        ("fetch", 405, "invalid"),
        ("other", 404, "not_found"),
    ]
    key = derive_audit_key(Settings.from_env(store_env).master_key or b"")
    assert records[0]["secret_id_hmac"] == secret_id_hmac(key, secret_id)
    assert records[1]["secret_id_hmac"] == records[0]["secret_id_hmac"]
    assert records[2]["secret_id_hmac"] == secret_id_hmac(key, missing)
    assert records[3]["secret_id_hmac"] is None
    assert records[0]["request_id"] == created.headers["x-request-id"]
    assert records[0]["user_agent"] == "ua/1"
    assert records[0]["client_ip"] == "testclient"  # the TestClient's peer address
    # Each in milliseconds, together within the time the client spent on all of them.
    assert all(r["latency_ms"] > 0 for r in records)
    assert sum(r["latency_ms"] for r in records) <= elapsed_ms
    text = repr(records)
    assert secret_id not in text and missing not in text


def test_requests_sending_one_x_request_id_are_audited_apart(
    client: TestClient, store_env: dict[str, str]
) -> None:
    # A caller's X-Request-ID is echoed, never the request's id: two requests sending the
    # same one leave two records with ids of the server's own, as each answer names them.
    mine = uuid.uuid4().hex
    answers = [
        client.post(
            "/vault/secret/fetch",
            json={"secret_id": str(uuid.uuid4())},
            headers={"X-Request-ID": mine},
        )
        for _ in range(2)
    ]
    assert [answer.headers["x-request-id"] for answer in answers] == [mine, mine]
    records = audit_records(store_env)
    assert [r["request_id"] for r in records] == [
        answer.headers["x-server-request-id"] for answer in answers
    ]
    assert len({r["request_id"] for r in records}) == 2
    assert mine not in repr(records)


def test_a_refusal_before_the_body_is_read_names_no_secret(
    make_client: Callable[..., TestClient], store_env: dict[str, str]
) -> None:
    # API keys (401) and the rate limit (429) refuse a call before its body is read, so
    # their records name no secret, whatever the body held; a call refused after the
    # handler read the body (404) names it by its HMAC.
    token = "t" * 40
    client = make_client(API_KEYS=f"ci:{token}", RATE_LIMIT="3/minute")
    secret_id = str(uuid.uuid4())
    body = {"secret_id": secret_id}
    auth = {"Authorization": f"Bearer {token}"}
    statuses = [
        client.post("/vault/secret/fetch", json=body).status_code,
        client.post("/vault/secret/fetch", json=body, headers=auth).status_code,
        client.post("/vault/secret/fetch", json=body, headers=auth).status_code,
        client.post("/vault/secret/fetch", json=body, headers=auth).status_code,
    ]
    assert statuses == [401, 404, 404, 429]
    key = derive_audit_key(Settings.from_env(store_env).master_key or b"")
    named = secret_id_hmac(key, secret_id)
    assert [(r["status"], r["secret_id_hmac"]) for r in audit_records(store_env)] == [
        (401, None), (404, named), (404, named), (429, None),
    ]  # fmt: skip


def audit_hash(env: dict[str, str], secret_id: str) -> list[str]:
    """What `secret-manager audit-hash` prints with this environment, line by line."""
    result = subprocess.run(
        [sys.executable, "-m", "vault", "audit-hash", secret_id],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.split()


def test_audit_hash_command_finds_the_records(
    client: TestClient, store_env: dict[str, str]
) -> None:
    secret_id = client.post("/vault/secret/create", json={"secret": b64(b"x")}).json()["secret_id"]
    (digest,) = audit_hash(store_env, secret_id.upper())
    assert [r["op"] for r in audit_records(store_env) if r["secret_id_hmac"] == digest] == [
        "create"
    ]


def test_audit_hash_still_finds_records_written_before_a_key_rotation(
    make_client: Callable[..., TestClient], store_env: dict[str, str]
) -> None:
    old_key = store_env["MASTER_KEY"]
    before = make_client()
    secret_id = before.post("/vault/secret/create", json={"secret": b64(b"x")}).json()["secret_id"]
    new_key = generate_key()
    after = make_client(MASTER_KEY=new_key, MASTER_KEY_PREVIOUS=old_key)
    assert after.post("/vault/secret/fetch", json={"secret_id": secret_id}).status_code == 200

    rotated = {**store_env, "MASTER_KEY": new_key, "MASTER_KEY_PREVIOUS": old_key}
    digests = audit_hash(rotated, secret_id)
    assert len(digests) == 2  # the active key's first, then the previous key's
    records = audit_records(store_env)
    assert [r["op"] for r in records if r["secret_id_hmac"] == digests[0]] == ["fetch"]
    assert [r["op"] for r in records if r["secret_id_hmac"] == digests[1]] == ["create"]


def test_explicit_audit_key_is_used(
    make_client: Callable[..., TestClient], store_env: dict[str, str]
) -> None:
    client = make_client(AUDIT_HMAC_KEY="k" * 40)
    secret_id = client.post("/vault/secret/create", json={"secret": b64(b"x")}).json()["secret_id"]
    assert audit_records(store_env)[0]["secret_id_hmac"] == secret_id_hmac(b"k" * 40, secret_id)


def test_audit_can_be_switched_off(
    make_client: Callable[..., TestClient], store_env: dict[str, str]
) -> None:
    client = make_client(AUDIT_ENABLED="false")
    assert client.post("/vault/secret/create", json={"secret": b64(b"x")}).status_code == 200
    assert audit_records(store_env) == []


def audit_calls(operation: str = "insert_audit") -> tuple[float, float]:
    """Store calls of ``operation`` so far (by default those that carried audit records
    alone), and the records they carried."""
    labels = {"operation": operation}
    calls = REGISTRY.get_sample_value("vault_store_batch_size_count", labels) or 0.0
    records = REGISTRY.get_sample_value("vault_store_batch_size_sum", labels) or 0.0
    return calls, records


def store_calls() -> Counter[str]:
    """Store calls made so far, by operation, of those a request can make."""
    operations = ("insert", "get", "read", "consume", "delete", "insert_audit")
    return Counter(
        {
            op: REGISTRY.get_sample_value("vault_store_operation_seconds_count", {"operation": op})
            or 0.0
            for op in operations
        }
    )


def test_a_create_and_every_fetch_each_make_one_store_call(
    client: TestClient, store_env: dict[str, str]
) -> None:
    # The request's own record and its audit record leave together: one round trip each.
    before = store_calls()
    created = client.post("/vault/secret/create", json={"secret": b64(b"x")})
    assert created.status_code == 200
    after_create = store_calls()
    secret_id = created.json()["secret_id"]
    assert client.post("/vault/secret/fetch", json={"secret_id": secret_id}).status_code == 200
    after_fetch = store_calls()
    missing = client.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
    assert missing.status_code == 404
    after_missing = store_calls()
    assert +(after_create - before) == Counter({"insert": 1})
    assert +(after_fetch - after_create) == Counter({"read": 1})
    assert +(after_missing - after_fetch) == Counter({"read": 1})
    # A read-limited secret's fetch takes its read in that same call, the last one too.
    once = client.post("/vault/secret/create", json={"secret": b64(b"y"), "max_reads": 2})
    once_id = once.json()["secret_id"]
    before_reads = store_calls()
    answers = [client.post("/vault/secret/fetch", json={"secret_id": once_id}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 404]
    assert [a.json().get("reads_left") for a in answers[:2]] == [1, 0]
    assert +(store_calls() - before_reads) == Counter({"read": 3})
    # ... and each has its audit record, saying what the caller got.
    records = [(r["op"], r["status"], r["outcome"]) for r in audit_records(store_env)]
    assert records == [("create", 200, "success"), ("fetch", 200, "success"),
                       ("fetch", 404, "not_found"), ("create", 200, "success"),
                       ("fetch", 200, "success"), ("fetch", 200, "success"),
                       ("fetch", 404, "not_found")]  # fmt: skip


def test_concurrent_requests_are_group_committed(store_env: dict[str, str]) -> None:
    app = create_app(Settings.from_env(store_env))
    count = 40
    # A fetch's audit record rides in the store call that reads its secret.
    calls_before, records_before = audit_calls("read")

    async def main() -> list[int]:
        async with app.router.lifespan_context(app):
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://t") as client:
                responses = await asyncio.gather(
                    *(
                        client.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
                        for _ in range(count)
                    )
                )
        return [r.status_code for r in responses]

    assert asyncio.run(main()) == [404] * count
    assert len(audit_records(store_env)) == count
    # The store's batcher carried the records in fewer calls than there were requests.
    calls, records = audit_calls("read")
    assert records - records_before == count
    assert calls - calls_before < count


def test_concurrent_writes_go_out_in_few_store_calls(store_env: dict[str, str]) -> None:
    count = 200
    calls_before, records_before = audit_calls()

    async def work(store: SecretStore) -> None:
        writer = AuditWriter(store.insert_audit)
        await writer.start()
        await asyncio.gather(*(writer.write(audit_record(f"r{i}")) for i in range(count)))
        await writer.close()

    on_store(store_env, work)
    assert len(audit_records(store_env)) == count
    calls, records = audit_calls()
    assert records - records_before == count
    assert calls - calls_before < 20  # 200 records, far fewer database calls


def test_a_record_written_again_is_stored_once(store_env: dict[str, str]) -> None:
    # A retry after a timeout whose first attempt landed after all: no duplicate records.
    records = [audit_record(f"r{i}") for i in range(5)]
    extra = audit_record("r-extra")

    async def work(store: SecretStore) -> None:
        first = await asyncio.gather(*(store.insert_audit(r) for r in records))
        assert first == [None] * 5
        again = [*records[2:], extra]
        results = await asyncio.gather(*(store.insert_audit(r) for r in again))
        assert results == [None] * 4

    on_store(store_env, work)
    stored = sorted(r["request_id"] for r in audit_records(store_env))
    assert stored == sorted(r.request_id for r in [*records, extra])


def unique_request_ids(store_env: dict[str, str]) -> None:
    """An operator's unique index on request_id (made after the store created its schema)."""
    if "MONGO_URI" in store_env:
        with pymongo.MongoClient(store_env["MONGO_URI"]) as client:
            client[store_env["MONGO_DB"]]["audit"].create_index("request_id", unique=True)
        return
    db = Path(store_env["DATA_DIR"]) / "vault.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE UNIQUE INDEX audit_request_id ON audit (request_id)")


def test_a_record_the_store_refuses_alone_never_holds_up_the_rest(
    store_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # An operator's unique index on request_id, and a caller that reuses its X-Request-ID.
    written: list[int] = []
    failed: list[int] = []

    async def work(store: SecretStore) -> None:
        unique_request_ids(store_env)
        writer = AuditWriter(
            store.insert_audit, wait=False, on_written=written.append, on_failed=failed.append
        )
        await writer.start()
        await writer.write(audit_record("reused"))
        await asyncio.sleep(0.5)
        for record in [audit_record("a"), audit_record("reused"), audit_record("b")]:
            await writer.write(record)
        await asyncio.sleep(1.0)
        await writer.write(audit_record("c"))  # later records are not stuck behind it
        await writer.close()

    with caplog.at_level(logging.ERROR, logger="secret_manager.audit"):
        on_store(store_env, work)
    assert sorted(r["request_id"] for r in audit_records(store_env)) == ["a", "b", "c", "reused"]
    assert sum(written) == 4
    assert failed == [1]  # tried once, not again and again
    logged = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert len(logged) == 1 and '"request_id":"reused"' in logged[0]


def secret_count(store_env: dict[str, str]) -> int:
    if "MONGO_URI" in store_env:
        with pymongo.MongoClient(store_env["MONGO_URI"]) as client:
            return client[store_env["MONGO_DB"]]["secrets"].count_documents({})
    with contextlib.closing(sqlite3.connect(Path(store_env["DATA_DIR"]) / "vault.db")) as conn:
        count: int = conn.execute("SELECT count(*) FROM secrets").fetchone()[0]
    return count


def unique_key_ids(store_env: dict[str, str]) -> None:
    """Below the service, a unique index on the secrets' key id: with one secret stored,
    every further create's secret write is refused (all are sealed by the same key)."""
    if "MONGO_URI" in store_env:
        with pymongo.MongoClient(store_env["MONGO_URI"]) as client:
            secrets = client[store_env["MONGO_DB"]]["secrets"]
            for name, info in secrets.index_information().items():
                if info["key"] == [("kid", 1)]:  # the key guard's (not unique)
                    secrets.drop_index(name)
            secrets.create_index("kid", unique=True)
        return
    with contextlib.closing(sqlite3.connect(Path(store_env["DATA_DIR"]) / "vault.db")) as conn:
        conn.execute("CREATE UNIQUE INDEX secrets_one_per_key ON secrets (key_id)")


def audit_failed() -> float:
    return REGISTRY.get_sample_value("vault_audit_records_total", {"result": "failed"}) or 0.0


def test_a_failed_secret_write_is_audited_with_the_answer_sent(
    client: TestClient, store_env: dict[str, str]
) -> None:
    # The secret and its audit record leave in one store call; when the secret is refused,
    # no record of a success is written, and the 500 the caller gets is, before it gets it.
    assert client.post("/vault/secret/create", json={"secret": b64(b"a")}).status_code == 200
    unique_key_ids(store_env)
    response = client.post("/vault/secret/create", json={"secret": b64(b"b")})
    assert response.status_code == 500
    assert "secret_id" not in response.json()
    request_id = response.headers["x-server-request-id"]
    mine = [r for r in audit_records(store_env) if r["request_id"] == request_id]
    assert [(r["op"], r["status"], r["outcome"]) for r in mine] == [("create", 500, "error")]
    assert mine[0]["secret_id_hmac"] is None  # no id was handed out
    assert secret_count(store_env) == 1


def unique_user_agents(store_env: dict[str, str]) -> None:
    """An operator's unique index on user_agent (made after the store created its schema)."""
    if "MONGO_URI" in store_env:
        with pymongo.MongoClient(store_env["MONGO_URI"]) as client:
            client[store_env["MONGO_DB"]]["audit"].create_index("user_agent", unique=True)
        return
    db = Path(store_env["DATA_DIR"]) / "vault.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE UNIQUE INDEX audit_user_agent ON audit (user_agent)")


def test_an_audit_record_refused_beside_its_secret_fails_closed(
    client: TestClient, store_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # An operator's unique index on user_agent, and a caller that sends the same one again:
    # the store takes the secret but refuses its audit record, in the same call. (Request
    # ids cannot collide so: the server makes each one, whatever X-Request-ID a caller sends.)
    unique_user_agents(store_env)
    user_agent = uuid.uuid4().hex
    headers = {"User-Agent": user_agent, "X-Request-ID": "reused"}
    first = client.post("/vault/secret/create", json={"secret": b64(b"a")}, headers=headers)
    assert first.status_code == 200
    failed = audit_failed()
    with caplog.at_level(logging.ERROR, logger="secret_manager.audit"):
        create = client.post("/vault/secret/create", json={"secret": b64(b"b")}, headers=headers)
        fetch = client.post(
            "/vault/secret/fetch", json={"secret_id": first.json()["secret_id"]}, headers=headers
        )
    # Fail closed: neither the new id nor the secret goes out without its audit record.
    assert (create.status_code, fetch.status_code) == (503, 503)
    assert "secret_id" not in create.json() and "secret" not in fetch.json()
    assert create.headers["retry-after"] == "5"
    mine = [r for r in audit_records(store_env) if r["user_agent"] == user_agent]
    assert [(r["op"], r["status"]) for r in mine] == [("create", 200)]  # only the first
    assert mine[0]["request_id"] == first.headers["x-server-request-id"]
    # What the callers got is in the log instead, one line each, and counted as failed.
    logged = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert len(logged) == 2
    assert all('"status":503' in line for line in logged)
    for answer, line in zip((create, fetch), logged, strict=True):
        assert f'"request_id":"{answer.headers["x-server-request-id"]}"' in line
    assert ['"op":"create"' in logged[0], '"op":"fetch"' in logged[1]] == [True, True]
    assert audit_failed() - failed == 2
    # The refused create's secret is stored, unacknowledged: nobody holds its id.
    assert secret_count(store_env) == 2


def test_audit_store_failure_fails_closed(
    tmp_path: Path, master_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path)}
    with TestClient(create_app(Settings.from_env(env))) as client:
        assert client.post("/vault/secret/create", json={"secret": b64(b"x")}).status_code == 200
        with contextlib.closing(sqlite3.connect(tmp_path / "vault.db")) as conn:
            conn.execute("DROP TABLE audit")
        with caplog.at_level(logging.ERROR, logger="secret_manager.audit"):
            response = client.post("/vault/secret/create", json={"secret": b64(b"y")})
            assert response.status_code == 503
            assert "secret_id" not in response.json()
            assert response.headers["retry-after"] == "5"
            assert client.get("/healthz").status_code == 200
            client.__exit__(None, None, None)  # shutdown: the queued refusal record is done
    # The record the store could not take is logged as what the caller got: one 503.
    logged = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert len(logged) == 1
    assert '"status":503' in logged[0] and '"outcome":"unavailable"' in logged[0]


def test_sqlite_retention_purges_old_records(tmp_path: Path, master_key: str) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path)}
    with TestClient(create_app(Settings.from_env(env))) as client:
        client.post("/vault/secret/create", json={"secret": b64(b"x")})
    old = sqlite_timestamp(dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    with contextlib.closing(sqlite3.connect(tmp_path / "vault.db")) as conn, conn:
        conn.execute("UPDATE audit SET ts = ?", (old,))
    with TestClient(create_app(Settings.from_env({**env, "AUDIT_TTL_DAYS": "2"}))) as client:
        client.post("/vault/secret/create", json={"secret": b64(b"y")})
        # The purge runs in a task at start, beside the request: wait for it.
        wait_until(lambda: len(audit_records(env)) == 1, 10, "the old record to be purged")
    records = audit_records(env)
    assert len(records) == 1
    assert records[0]["ts"] > old


def test_mongo_retention_follows_the_setting_across_restarts(
    mongo_uri: str, master_key: str
) -> None:
    env = {"MASTER_KEY": master_key, "MONGO_URI": mongo_uri, "MONGO_DB": "t" + uuid.uuid4().hex}

    def ttl_indexes() -> list[int]:
        with pymongo.MongoClient(mongo_uri) as mongo:
            indexes = mongo[env["MONGO_DB"]]["audit"].index_information()
        return sorted(i["expireAfterSeconds"] for i in indexes.values()
                      if "expireAfterSeconds" in i)  # fmt: skip

    # 0 means forever: the TTL index of 30 days must go, or records would still expire.
    steps = [("7", [7 * 86400]), ("30", [30 * 86400]), ("0", []), ("7", [7 * 86400])]
    for ttl_days, wanted in steps:
        app = create_app(Settings.from_env({**env, "AUDIT_TTL_DAYS": ttl_days}))
        with TestClient(app) as client:
            client.post("/vault/secret/create", json={"secret": b64(b"x")})
            # Retention is applied by a task at start, beside the request: wait for it.
            wait_until(lambda wanted=wanted: ttl_indexes() == wanted, 10, f"TTL index {wanted}")
        assert ttl_indexes() == wanted


@pytest.mark.parametrize("ttl_days", ["0", "7"])
def test_mongo_retention_is_a_ttl_index(mongo_uri: str, master_key: str, ttl_days: str) -> None:
    env = {
        "MASTER_KEY": master_key,
        "MONGO_URI": mongo_uri,
        "MONGO_DB": "t" + uuid.uuid4().hex[:16],
        "AUDIT_TTL_DAYS": ttl_days,
    }
    wanted = [int(ttl_days) * 86400] if ttl_days != "0" else []

    def ttl() -> list[int]:
        with pymongo.MongoClient(mongo_uri) as mongo:
            indexes = mongo[env["MONGO_DB"]]["audit"].index_information()
        return [i.get("expireAfterSeconds") for i in indexes.values() if i["key"][0][0] == "ts"]

    with TestClient(create_app(Settings.from_env(env))) as client:
        client.post("/vault/secret/create", json={"secret": b64(b"x")})
        # Retention is applied by a task at start, beside the request: give it the time.
        wait_until(lambda: ttl() == wanted and len(audit_records(env)) == 1, 10, "retention")
    assert ttl() == wanted
