"""A secret's life through the API: expiry, read limits and deletion, on both stores.

A request without the new fields gets exactly today's answer; expired, used-up, deleted
and unknown ids are indistinguishable to the caller (404, one detail) and told apart only
in the audit log; read limits hold exactly under concurrency, on one replica, across two
replicas sharing MongoDB, and across two workers sharing one SQLite file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from tests.conftest import RawRecords, ServerProcess, b64, keys_of
from tests.test_audit import audit_records
from vault.app import create_app
from vault.records import record_key
from vault.settings import Settings

NOT_FOUND = {"detail": "no secret has this secret_id; check the id you were given"}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
StartServer = Callable[..., ServerProcess]


def create(client: TestClient, secret: bytes = b"s3cret", **fields: object) -> dict[str, Any]:
    response = client.post("/vault/secret/create/", json={"secret": b64(secret), **fields})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def fetch(client: TestClient, secret_id: str) -> httpx.Response:
    return client.post("/vault/secret/fetch", json={"secret_id": secret_id})


def delete(client: TestClient, secret_id: str, path: str = "/vault/secret/delete") -> Any:
    return client.post(path, json={"secret_id": secret_id})


def expires_at(answer: dict[str, Any]) -> dt.datetime:
    value = answer["expires_at"]
    assert RFC3339_UTC.fullmatch(value), value
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def wait_past(moment: dt.datetime) -> None:
    time.sleep(max(0.0, (moment - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)


def test_without_the_new_fields_the_answers_are_exactly_as_before(client: TestClient) -> None:
    answer = create(client)
    assert list(answer) == ["secret_id"]
    assert fetch(client, answer["secret_id"]).json() == {"secret": b64(b"s3cret")}
    assert fetch(client, answer["secret_id"]).status_code == 200  # no limit: read again


def test_an_expiring_secret_says_when_and_lives_at_least_its_ttl(client: TestClient) -> None:
    before = dt.datetime.now(dt.UTC)
    answer = create(client, ttl_seconds=3600)
    after = dt.datetime.now(dt.UTC)
    assert set(answer) == {"secret_id", "expires_at"}
    expiry = expires_at(answer)
    assert before + dt.timedelta(seconds=3600) <= expiry + dt.timedelta(seconds=1)
    assert expiry <= after + dt.timedelta(seconds=3601)
    fetched = fetch(client, answer["secret_id"]).json()
    assert fetched == {"secret": b64(b"s3cret"), "expires_at": answer["expires_at"]}


def test_an_expired_secret_answers_like_an_unknown_id_before_any_purge(
    make_client: Callable[..., TestClient],
    store_env: dict[str, str],
    raw_records: RawRecords,
) -> None:
    client = make_client(SECRET_PURGE_INTERVAL_SECONDS="3600")  # only the start-up purge
    answer = create(client, ttl_seconds=1)
    wait_past(expires_at(answer))

    expired = fetch(client, answer["secret_id"])
    unknown = fetch(client, str(uuid.uuid4()))
    assert (expired.status_code, expired.json()) == (404, NOT_FOUND)
    assert (unknown.status_code, unknown.json()) == (404, NOT_FOUND)
    # Not purged yet, still refused.
    assert record_key(answer["secret_id"]) in raw_records.record_keys()
    # Only the audit log tells them apart.
    outcomes = [(r["op"], r["outcome"]) for r in audit_records(store_env)]
    assert outcomes[-2:] == [("fetch", "expired"), ("fetch", "not_found")]


def test_a_read_limited_secret_counts_down_then_is_gone(
    client: TestClient, raw_records: RawRecords
) -> None:
    answer = create(client, max_reads=3)
    assert answer == {"secret_id": answer["secret_id"], "reads_left": 3}
    secret_id = answer["secret_id"]
    left = [fetch(client, secret_id).json() for _ in range(3)]
    assert left == [{"secret": b64(b"s3cret"), "reads_left": n} for n in (2, 1, 0)]
    # Removed by the read that used the last.
    assert record_key(secret_id) not in raw_records.record_keys()
    used_up = fetch(client, secret_id)
    assert (used_up.status_code, used_up.json()) == (404, NOT_FOUND)


def test_both_limits_together(client: TestClient) -> None:
    answer = create(client, ttl_seconds=60, max_reads=1)
    assert set(answer) == {"secret_id", "expires_at", "reads_left"}
    fetched = fetch(client, answer["secret_id"]).json()
    assert fetched == {
        "secret": b64(b"s3cret"),
        "expires_at": answer["expires_at"],
        "reads_left": 0,
    }


@pytest.mark.parametrize("field", ["ttl_seconds", "max_reads"])
@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "5", None, 0, -1, [1], {"n": 1}])
def test_bad_lifecycle_values_are_400_naming_the_field_and_store_nothing(
    client: TestClient, raw_records: RawRecords, field: str, value: object
) -> None:
    response = client.post("/vault/secret/create/", json={"secret": b64(b"x"), field: value})
    assert response.status_code == 400
    cap = "315360000" if field == "ttl_seconds" else "1000000"
    assert response.json()["detail"].startswith(f"field {field!r} must be a JSON integer")
    assert f"from 1 to {cap}" in response.json()["detail"]
    assert raw_records.record_keys() == set()


def test_values_past_the_caps_are_refused_and_the_caps_themselves_taken(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(SECRET_MAX_TTL_SECONDS="600")
    over_ttl = client.post("/vault/secret/create", json={"secret": b64(b"x"), "ttl_seconds": 601})
    assert over_ttl.status_code == 400
    assert "from 1 to 600" in over_ttl.json()["detail"]
    over_reads = client.post(
        "/vault/secret/create", json={"secret": b64(b"x"), "max_reads": 1_000_001}
    )
    assert over_reads.status_code == 400
    assert set(create(client, ttl_seconds=600, max_reads=1_000_000)) == {
        "secret_id",
        "expires_at",
        "reads_left",
    }


def test_the_default_ttl_applies_when_a_create_names_none(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(SECRET_DEFAULT_TTL_SECONDS="120")
    started = dt.datetime.now(dt.UTC)
    answer = create(client)
    assert started + dt.timedelta(seconds=119) <= expires_at(answer)
    assert expires_at(answer) <= started + dt.timedelta(seconds=122)
    named = create(client, ttl_seconds=5)
    assert expires_at(named) <= started + dt.timedelta(seconds=7)


@pytest.mark.parametrize("path", ["/vault/secret/delete", "/vault/secret/delete/"])
def test_delete_removes_the_ciphertext_and_then_answers_like_an_unknown_id(
    client: TestClient, raw_records: RawRecords, store_env: dict[str, str], path: str
) -> None:
    kept = create(client)["secret_id"]
    secret_id = create(client, max_reads=5)["secret_id"]
    deleted = delete(client, secret_id, path)
    assert (deleted.status_code, deleted.json()) == (200, {"secret_id": secret_id, "deleted": True})
    assert raw_records.record_keys() == keys_of(kept)
    again = delete(client, secret_id, path)
    assert (again.status_code, again.json()) == (404, NOT_FOUND)
    assert (fetch(client, secret_id).status_code, fetch(client, secret_id).json()) == (
        404,
        NOT_FOUND,
    )
    malformed = delete(client, "not-a-uuid", path)
    assert malformed.status_code == 400
    records = [(r["op"], r["status"], r["outcome"]) for r in audit_records(store_env)]
    assert records[2:4] == [("delete", 200, "success"), ("delete", 404, "not_found")]
    assert records[-1] == ("delete", 400, "invalid")


def test_deleting_an_expired_secret_is_404_and_audited_as_expired(
    client: TestClient, raw_records: RawRecords, store_env: dict[str, str]
) -> None:
    answer = create(client, ttl_seconds=1)
    wait_past(expires_at(answer))
    refused = delete(client, answer["secret_id"])
    assert (refused.status_code, refused.json()) == (404, NOT_FOUND)
    assert raw_records.record_keys() == set()
    assert audit_records(store_env)[-1]["outcome"] == "expired"


def test_delete_needs_an_api_key_when_keys_are_on(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    token = "deploy-token-" + "d" * 32
    keys = tmp_path / "keys"
    keys.write_text(f"deploy:{token}\n")
    client = make_client(API_KEYS_FILE=str(keys), RATE_LIMIT="off")
    auth = {"Authorization": f"Bearer {token}"}
    created = client.post("/vault/secret/create", json={"secret": b64(b"x")}, headers=auth)
    secret_id = created.json()["secret_id"]
    assert delete(client, secret_id).status_code == 401
    assert fetch(client, secret_id).status_code == 401
    allowed = client.post("/vault/secret/delete", json={"secret_id": secret_id}, headers=auth)
    assert allowed.status_code == 200


def test_lifecycle_counters(client: TestClient) -> None:
    def counter(name: str, **labels: str) -> float:
        text = client.get("/metrics").text
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        series = f"{name}{{{wanted}}}" if wanted else name
        match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    before = {
        "request": counter("vault_secrets_deleted_total", reason="request"),
        "last_read": counter("vault_secrets_deleted_total", reason="last_read"),
        "expired": counter("vault_secrets_expired_total", op="fetch"),
        "fetched_expired": counter("vault_secrets_fetched_total", outcome="expired"),
    }
    delete(client, create(client)["secret_id"])
    one_time = create(client, max_reads=1)["secret_id"]
    fetch(client, one_time)
    fetch(client, one_time)
    short = create(client, ttl_seconds=1)
    wait_past(expires_at(short))
    fetch(client, short["secret_id"])
    after = {
        "request": counter("vault_secrets_deleted_total", reason="request"),
        "last_read": counter("vault_secrets_deleted_total", reason="last_read"),
        "expired": counter("vault_secrets_expired_total", op="fetch"),
        "fetched_expired": counter("vault_secrets_fetched_total", outcome="expired"),
    }
    assert {k: after[k] - before[k] for k in before} == {
        "request": 1.0,
        "last_read": 1.0,
        "expired": 1.0,
        "fetched_expired": 1.0,
    }


def test_the_purge_removes_expired_records_in_the_background(
    make_client: Callable[..., TestClient], raw_records: RawRecords
) -> None:
    client = make_client(SECRET_PURGE_INTERVAL_SECONDS="1")
    living = create(client)["secret_id"]
    short = create(client, ttl_seconds=1)
    wait_past(expires_at(short))
    deadline = time.monotonic() + 10
    short_key = record_key(short["secret_id"])
    while short_key in raw_records.record_keys() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert raw_records.record_keys() == keys_of(living)


# Exactly k, with real servers and overlapping requests.

READS_ALLOWED = 5
FETCHES = 24
SECRETS = 3


def served_per_secret(urls: list[str]) -> list[int]:
    """Create SECRETS secrets limited to READS_ALLOWED reads, fetch each FETCHES times at
    once (spread over ``urls``, released together), and count the answers that carried it."""
    with httpx.Client(timeout=30) as client:
        made = [
            client.post(
                urls[0] + "/vault/secret/create",
                json={"secret": b64(f"secret {n}".encode()), "max_reads": READS_ALLOWED},
            ).json()["secret_id"]
            for n in range(SECRETS)
        ]
    start = threading.Barrier(FETCHES * SECRETS)

    def one(job: int) -> tuple[int, int, str | None]:
        secret_index, url = job % SECRETS, urls[job % len(urls)]
        with httpx.Client(timeout=30) as client:  # a connection of its own per request
            start.wait()
            response = client.post(
                url + "/vault/secret/fetch", json={"secret_id": made[secret_index]}
            )
        secret = response.json().get("secret") if response.status_code == 200 else None
        return secret_index, response.status_code, secret

    with ThreadPoolExecutor(FETCHES * SECRETS) as pool:
        results = list(pool.map(one, range(FETCHES * SECRETS)))
    assert {status for _, status, _ in results} <= {200, 404}
    served = [0] * SECRETS
    for index, status, secret in results:
        if status == 200:
            assert secret == b64(f"secret {index}".encode())
            served[index] += 1
    return served


@pytest.mark.slow
def test_exactly_k_reads_on_one_server(
    start_server: StartServer, store_env: dict[str, str]
) -> None:
    server = start_server({**store_env, "RATE_LIMIT": "off"})
    assert served_per_secret([server.url]) == [READS_ALLOWED] * SECRETS


@pytest.mark.slow
def test_exactly_k_reads_across_two_replicas_sharing_mongodb(
    start_server: StartServer, mongo_uri: str, master_key: str, tmp_path: Path
) -> None:
    env = {
        "MASTER_KEY": master_key,
        "MONGO_URI": mongo_uri,
        "MONGO_DB": "t" + uuid.uuid4().hex[:16],
        "RATE_LIMIT": "off",
    }
    one = start_server({**env, "DATA_DIR": str(tmp_path / "one")})
    two = start_server({**env, "DATA_DIR": str(tmp_path / "two")})
    assert served_per_secret([one.url, two.url]) == [READS_ALLOWED] * SECRETS


@pytest.mark.slow
def test_exactly_k_reads_across_two_workers_on_the_embedded_store(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    server = start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data"), "RATE_LIMIT": "off"},
        "--workers",
        "2",
    )
    assert served_per_secret([server.url]) == [READS_ALLOWED] * SECRETS


def stored_ciphertext(data_dir: Path, secret_id: str) -> bytes:
    with contextlib.closing(sqlite3.connect(data_dir / "vault.db")) as conn:
        (ciphertext,) = conn.execute(
            "SELECT ciphertext FROM secrets WHERE record_key = ?", (record_key(secret_id),)
        ).fetchone()
    return bytes(ciphertext)


def test_a_deleted_secret_leaves_no_ciphertext_in_the_sqlite_file(
    tmp_path: Path, master_key: str
) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path)}
    with TestClient(create_app(Settings.from_env(env))) as client:
        ids = [create(client, os.urandom(512))["secret_id"] for _ in range(3)]
        ciphertexts = {i: stored_ciphertext(tmp_path, i) for i in ids}
        assert delete(client, ids[0]).status_code == 200
        one_time = create(client, os.urandom(512), max_reads=1)["secret_id"]
        ciphertexts[one_time] = stored_ciphertext(tmp_path, one_time)
        assert fetch(client, one_time).status_code == 200
    # The server has stopped: its write-ahead log is checkpointed into the file and removed.
    assert not (tmp_path / "vault.db-wal").exists()
    data = (tmp_path / "vault.db").read_bytes()
    assert ciphertexts[ids[0]] not in data
    assert ciphertexts[one_time] not in data
    assert ciphertexts[ids[1]] in data  # the check can see a ciphertext that is there
