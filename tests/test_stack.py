"""The whole middleware stack in process: what each layer adds, and that each switches off."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from tests.conftest import b64, wait_until
from tests.test_audit import audit_records
from vault.app import create_app
from vault.settings import Settings


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def fetch_unknown(client: TestClient) -> int:
    response = client.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
    return response.status_code


def test_rate_limited_calls_are_refused_recorded_and_counted(
    make_client: Callable[..., TestClient], store_env: dict[str, str]
) -> None:
    client = make_client(RATE_LIMIT="3/hour;1000/second")
    limited_before = sample("vault_rate_limited_total")
    http_before = sample(
        "http_requests_total", method="POST", route="/vault/secret/fetch", status="429"
    )
    assert [fetch_unknown(client) for _ in range(3)] == [404, 404, 404]
    response = client.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
    assert response.status_code == 429
    # The hourly limit refused it: wait for its window to end, which the three agree on.
    retry_after = response.headers["retry-after"]
    assert 1 <= int(retry_after) <= 3600
    assert response.headers["ratelimit-reset"] == retry_after
    assert response.json()["detail"] == (
        "rate limit exceeded: at most 3 requests per hour from one client; "
        f"retry after {retry_after} s"
    )
    assert response.headers["ratelimit-limit"] == "3"
    assert response.headers["ratelimit-remaining"] == "0"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert response.headers["cache-control"] == "no-store"
    assert client.get("/healthz").status_code == 200  # probes are exempt
    assert client.get("/metrics").status_code == 200

    last = audit_records(store_env)[-1]
    assert (last["op"], last["status"], last["outcome"]) == ("fetch", 429, "rate_limited")
    assert sample("vault_rate_limited_total") == limited_before + 1
    assert (
        sample("http_requests_total", method="POST", route="/vault/secret/fetch", status="429")
        == http_before + 1
    )


@pytest.mark.parametrize("per_client", ["100/second;3000/minute", "off"])
def test_a_key_over_its_limit_is_refused_recorded_and_counted_and_another_key_is_not(
    make_client: Callable[..., TestClient], store_env: dict[str, str], per_client: str
) -> None:
    tokens = {"noisy": "n" * 40, "quiet": "q" * 40}
    client = make_client(
        API_KEYS=",".join(f"{name}:{token}" for name, token in tokens.items()),
        RATE_LIMIT=per_client,
        RATE_LIMIT_PER_KEY="2/hour",
    )

    def fetch_as(name: str) -> httpx2.Response:
        auth = {"Authorization": f"Bearer {tokens[name]}"}
        return client.post(
            "/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())}, headers=auth
        )

    limited_before = sample("vault_rate_limited_total")
    assert [fetch_as("noisy").status_code for _ in range(2)] == [404, 404]
    refused = fetch_as("noisy")
    assert refused.status_code == 429
    retry_after = refused.headers["retry-after"]
    assert refused.json()["detail"] == (
        "rate limit exceeded: at most 2 requests per hour for this API key; "
        f"retry after {retry_after} s"
    )
    assert (refused.headers["ratelimit-limit"], refused.headers["ratelimit-remaining"]) == (
        "2",
        "0",
    )
    assert refused.headers["ratelimit-reset"] == retry_after
    # The same client address, another key: its own budget.
    assert [fetch_as("quiet").status_code for _ in range(2)] == [404, 404]
    assert fetch_as("quiet").status_code == 429

    records = [(r["api_key_name"], r["status"], r["outcome"]) for r in audit_records(store_env)]
    assert records == [
        ("noisy", 404, "not_found"), ("noisy", 404, "not_found"), ("noisy", 429, "rate_limited"),
        ("quiet", 404, "not_found"), ("quiet", 404, "not_found"), ("quiet", 429, "rate_limited"),
    ]  # fmt: skip
    assert sample("vault_rate_limited_total") == limited_before + 2


def test_successful_answers_carry_rate_limit_headers(client: TestClient) -> None:
    response = client.post("/vault/secret/create", json={"secret": b64(b"x")})
    assert response.status_code == 200
    assert int(response.headers["ratelimit-remaining"]) < int(response.headers["ratelimit-limit"])


def test_vault_metrics_follow_what_clients_saw(client: TestClient) -> None:
    created = sample("vault_secrets_created_total")
    fetched_ok = sample("vault_secrets_fetched_total", outcome="success")
    fetched_missing = sample("vault_secrets_fetched_total", outcome="not_found")
    written = sample("vault_audit_records_total", result="written")
    inserts = sample("vault_store_operation_seconds_count", operation="insert")

    secret_id = client.post("/vault/secret/create", json={"secret": b64(b"x")}).json()["secret_id"]
    client.post("/vault/secret/fetch", json={"secret_id": secret_id})
    fetch_unknown(client)

    assert sample("vault_secrets_created_total") == created + 1
    assert sample("vault_secrets_fetched_total", outcome="success") == fetched_ok + 1
    assert sample("vault_secrets_fetched_total", outcome="not_found") == fetched_missing + 1
    assert sample("vault_audit_records_total", result="written") == written + 3
    assert sample("vault_store_operation_seconds_count", operation="insert") == inserts + 1
    text = client.get("/metrics").text
    assert "vault_secrets_created_total" in text
    assert 'route="/vault/secret/fetch"' in text
    assert secret_id not in text


def test_audit_failure_answers_503_and_is_counted(tmp_path: Path, master_key: str) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path)}
    with TestClient(create_app(Settings.from_env(env))) as client:
        client.get("/readyz")
        with contextlib.closing(sqlite3.connect(tmp_path / "vault.db")) as conn:
            conn.execute("DROP TABLE audit")
        failed = sample("vault_audit_records_total", result="failed")
        assert fetch_unknown(client) == 503
        # A 503 acknowledges nothing, so its own record is written after the answer, in the
        # background: its failure is counted a moment later, once, not before the answer.
        wait_until(
            lambda: sample("vault_audit_records_total", result="failed") > failed,
            5,
            "the audit failure counted",
        )
        time.sleep(0.2)
        assert sample("vault_audit_records_total", result="failed") == failed + 1


def test_forwarded_for_is_believed_only_from_trusted_proxies(
    tmp_path: Path, master_key: str
) -> None:
    def client_ip_recorded(trusted: str) -> str:
        data_dir = tmp_path / uuid.uuid4().hex
        env = {"MASTER_KEY": master_key, "DATA_DIR": str(data_dir), "TRUSTED_PROXIES": trusted}
        app = create_app(Settings.from_env(env))

        async def main() -> None:
            async with app.router.lifespan_context(app):
                transport = httpx2.ASGITransport(app=app, client=("10.1.2.3", 5555))
                async with httpx2.AsyncClient(transport=transport, base_url="http://t") as c:
                    await c.post(
                        "/vault/secret/fetch",
                        json={"secret_id": str(uuid.uuid4())},
                        headers={"X-Forwarded-For": "203.0.113.9"},
                    )

        asyncio.run(main())
        return str(audit_records({"DATA_DIR": str(data_dir)})[0]["client_ip"])

    assert client_ip_recorded("") == "10.1.2.3"
    assert client_ip_recorded("10.0.0.0/8") == "203.0.113.9"


def test_every_optional_layer_switches_off(
    make_client: Callable[..., TestClient], store_env: dict[str, str]
) -> None:
    client = make_client(
        AUDIT_ENABLED="false",
        RATE_LIMIT="off",
        METRICS_ENABLED="false",
        OTEL_TRACES_EXPORTER="none",
    )
    responses = [fetch_unknown(client) for _ in range(5)]
    assert responses == [404] * 5
    response = client.post("/vault/secret/create", json={"secret": b64(b"x")})
    assert response.status_code == 200
    assert "ratelimit-limit" not in response.headers
    assert client.get("/metrics").status_code == 404
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    assert audit_records(store_env) == []


def test_every_503_asks_for_the_configured_retry_after(tmp_path: Path, master_key: str) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path), "RETRY_AFTER_SECONDS": "7"}
    with TestClient(create_app(Settings.from_env(env))) as client:
        client.get("/readyz")
        with contextlib.closing(sqlite3.connect(tmp_path / "vault.db")) as conn:
            conn.execute("DROP TABLE audit")
        # The fetch's one store call writes its audit record too: it fails as a whole.
        answer = client.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "7"
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.headers["retry-after"] == "7"
