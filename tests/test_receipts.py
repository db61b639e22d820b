"""Receipts: a create may keep one, and its id asks what became of the secret, on both
stores, across workers and replicas, for its tenant only, until its retention ends."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from tests.conftest import ServerProcess, b64, wait_until
from tests.test_audit import audit_records

UNKNOWN = "00000000-0000-4000-8000-000000000000"


def made(client: TestClient | httpx.Client, **fields: Any) -> dict[str, Any]:
    answer = client.post("/vault/secret/create", json={"secret": b64(b"s3cret"), **fields})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def status(client: TestClient | httpx.Client, receipt_id: str) -> httpx.Response:
    return client.post("/vault/secret/status", json={"receipt_id": receipt_id})


def moment(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_receipt_is_answered_only_when_asked_for(client: TestClient) -> None:
    assert set(made(client)) == {"secret_id"}
    assert set(made(client, receipt=False, label="no receipt")) == {"secret_id"}
    with_receipt = made(client, receipt=True, max_reads=2)
    assert set(with_receipt) == {"secret_id", "reads_left", "receipt_id"}
    assert with_receipt["receipt_id"] != with_receipt["secret_id"]
    assert str(uuid.UUID(with_receipt["receipt_id"])) == with_receipt["receipt_id"]
    # The receipt id reads nothing, and the secret id asks no status.
    fetched = client.post("/vault/secret/fetch", json={"secret_id": with_receipt["receipt_id"]})
    assert fetched.status_code == 404
    assert status(client, with_receipt["secret_id"]).status_code == 404


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"receipt": "yes"}, "'receipt'"),
        ({"receipt": 1}, "'receipt'"),
        ({"label": ""}, "'label'"),
        ({"label": "x" * 201}, "'label'"),
        ({"label": "two\nlines"}, "'label'"),
        ({"label": 5}, "'label'"),
    ],
)
def test_malformed_receipt_fields_are_refused(
    client: TestClient, fields: dict[str, Any], named: str
) -> None:
    answer = client.post("/vault/secret/create", json={"secret": b64(b"x"), **fields})
    assert answer.status_code == 400 and named in answer.json()["detail"], answer.text


def test_status_follows_the_secret_through_its_states(client: TestClient) -> None:
    started = dt.datetime.now(dt.UTC)
    limited = made(client, receipt=True, max_reads=2, label="deploy token for ci")
    first = status(client, limited["receipt_id"]).json()
    assert first == {
        "state": "active",
        "label": "deploy token for ci",
        "created_at": first["created_at"],
        "expires_at": None,
        "max_reads": 2,
        "reads_left": 2,
        "reads": 0,
        "first_read_at": None,
        "last_read_at": None,
        "ended_at": None,
    }
    assert started - dt.timedelta(seconds=1) <= moment(first["created_at"])
    # Asking spends nothing: the two reads are still there.
    for _ in range(3):
        assert status(client, limited["receipt_id"]).json()["reads_left"] == 2
    fetch = {"secret_id": limited["secret_id"]}
    assert client.post("/vault/secret/fetch", json=fetch).json()["reads_left"] == 1
    after_one = status(client, limited["receipt_id"]).json()
    assert (after_one["state"], after_one["reads"], after_one["reads_left"]) == ("active", 1, 1)
    assert after_one["first_read_at"] == after_one["last_read_at"] is not None
    assert client.post("/vault/secret/fetch", json=fetch).json()["reads_left"] == 0
    used_up = status(client, limited["receipt_id"]).json()
    assert (used_up["state"], used_up["reads"], used_up["reads_left"]) == ("used_up", 2, 0)
    assert used_up["first_read_at"] == after_one["first_read_at"]
    assert moment(used_up["last_read_at"]) >= moment(after_one["last_read_at"])
    assert used_up["ended_at"] == used_up["last_read_at"]  # the last read ended it

    deleted = made(client, receipt=True)
    assert client.post("/vault/secret/delete", json={"secret_id": deleted["secret_id"]}).is_success
    gone = status(client, deleted["receipt_id"]).json()
    assert (gone["state"], gone["reads"], gone["max_reads"]) == ("deleted", 0, None)
    assert gone["ended_at"] is not None and gone["reads_left"] is None

    expiring = made(client, receipt=True, ttl_seconds=1)
    assert status(client, expiring["receipt_id"]).json()["state"] == "active"
    wait_until(
        lambda: status(client, expiring["receipt_id"]).json()["state"] == "expired",
        5,
        "the secret to expire",
    )
    expired = status(client, expiring["receipt_id"]).json()
    assert expired["ended_at"] == expired["expires_at"].replace("Z", ".000Z")
    # A fetch of the expired secret is refused and counts no read.
    client.post("/vault/secret/fetch", json={"secret_id": expiring["secret_id"]})
    assert status(client, expiring["receipt_id"]).json()["reads"] == 0


def test_a_receipt_ends_its_retention_with_the_answer_of_an_unknown_one(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(RECEIPT_RETENTION_SECONDS="1")
    kept = made(client, receipt=True)
    live = made(client, receipt=True)
    client.post("/vault/secret/delete", json={"secret_id": kept["secret_id"]})
    assert status(client, kept["receipt_id"]).json()["state"] == "deleted"
    unknown = status(client, UNKNOWN)
    wait_until(
        lambda: status(client, kept["receipt_id"]).status_code == 404, 5, "the retention to end"
    )
    assert status(client, kept["receipt_id"]).content == unknown.content
    assert status(client, live["receipt_id"]).json()["state"] == "active"  # still alive


def test_status_refuses_malformed_ids(client: TestClient) -> None:
    for body in ({}, {"receipt_id": 5}, {"receipt_id": "not-a-uuid"}):
        answer = client.post("/vault/secret/status", json=body)
        assert answer.status_code == 400, body
    assert "receipt_id" in client.post("/vault/secret/status", json={}).json()["detail"]


TOKENS = {
    "acme/ci": "ci-" + "c" * 40,
    "acme/auditor": "auditor-" + "a" * 40,
    "acme/reader": "reader-" + "r" * 40,
    "beta/ci": "beta-" + "b" * 40,
}


def test_only_the_creators_tenant_with_the_status_scope_may_ask(
    make_client: Callable[..., TestClient], tmp_path: Path, store_env: dict[str, str]
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(
        f"acme/ci:{TOKENS['acme/ci']}\nacme/auditor:{TOKENS['acme/auditor']}:status\n"
        f"acme/reader:{TOKENS['acme/reader']}:fetch\nbeta/ci:{TOKENS['beta/ci']}\n"
    )
    client = make_client(API_KEYS_FILE=str(keys), RATE_LIMIT="off")

    def as_key(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[name]}"}

    created = client.post(
        "/vault/secret/create",
        json={"secret": b64(b"x"), "receipt": True},
        headers=as_key("acme/ci"),
    ).json()
    body = {"receipt_id": created["receipt_id"]}
    for name in ("acme/ci", "acme/auditor"):
        asked = client.post("/vault/secret/status", json=body, headers=as_key(name))
        assert asked.status_code == 200 and asked.json()["state"] == "active", name
    refused = client.post("/vault/secret/status", json=body, headers=as_key("acme/reader"))
    assert refused.status_code == 403 and "status" in refused.json()["detail"]
    other = client.post("/vault/secret/status", json=body, headers=as_key("beta/ci"))
    unknown = client.post(
        "/vault/secret/status", json={"receipt_id": UNKNOWN}, headers=as_key("beta/ci")
    )
    assert other.status_code == 404 and other.content == unknown.content
    outcomes = [(r["op"], r["status"], r["outcome"], r["tenant"]) for r in audit_records(store_env)]
    assert ("status", 404, "denied", "beta") in outcomes
    assert ("status", 403, "denied", "acme") in outcomes
    # The receipt id is audited by its HMAC only, as a secret id is.
    records = audit_records(store_env)
    assert created["receipt_id"] not in repr(records)
    assert any(r["op"] == "status" and r["secret_id_hmac"] for r in records)


def _hammer(servers: list[ServerProcess], secret_id: str, reads: int) -> list[int]:
    def fetch(k: int) -> int:
        url = servers[k % len(servers)].url + "/vault/secret/fetch"
        return httpx.post(url, json={"secret_id": secret_id}, timeout=10).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(fetch, range(reads)))


def _exact_across(servers: list[ServerProcess]) -> None:
    """Reads raced from every process: the receipt counts each served read once, ends
    once, and its last read is the latest served."""
    with httpx.Client(base_url=servers[0].url, timeout=10) as client:
        limited = made(client, receipt=True, max_reads=10)
        unlimited = made(client, receipt=True)
    before = time.time()
    statuses = _hammer(servers, limited["secret_id"], 24)
    assert statuses.count(200) == 10 and statuses.count(404) == 14
    assert _hammer(servers, unlimited["secret_id"], 24) == [200] * 24
    after = time.time()
    with httpx.Client(base_url=servers[-1].url, timeout=10) as client:
        used_up = status(client, limited["receipt_id"]).json()
        counted = status(client, unlimited["receipt_id"]).json()
    assert (used_up["state"], used_up["reads"], used_up["reads_left"]) == ("used_up", 10, 0)
    assert used_up["ended_at"] == used_up["last_read_at"]
    assert (counted["state"], counted["reads"]) == ("active", 24)
    for answer in (used_up, counted):
        first, last = moment(answer["first_read_at"]), moment(answer["last_read_at"])
        assert before - 1 <= first.timestamp() <= last.timestamp() <= after + 1


@pytest.mark.slow
def test_receipts_are_exact_across_two_workers(
    start_server: Callable[..., ServerProcess], store_env: dict[str, str]
) -> None:
    server = start_server({**store_env, "RATE_LIMIT": "off"}, "--workers", "2")
    _exact_across([server, server])


@pytest.mark.slow
def test_receipts_are_exact_across_two_replicas(start_replicas: Callable[..., Any]) -> None:
    servers, _ = start_replicas()
    _exact_across(servers)
