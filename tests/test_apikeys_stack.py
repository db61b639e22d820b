"""Optional API keys in the whole app: refusals audited, names recorded, probes open, a key's
scopes enforced."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from starlette.testclient import TestClient

from tests.conftest import ServerProcess, b64, clean_env
from tests.test_audit import audit_records
from tests.test_stack import sample

ALICE = "alice-token-" + "a" * 32
BOB = "bob-token-" + "b" * 32


def test_vault_calls_need_a_known_key_and_records_name_it(
    make_client: Callable[..., TestClient], store_env: dict[str, str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# who may call\nalice:{ALICE}\nbob:{BOB}\n")
    client = make_client(API_KEYS_FILE=str(keys), RATE_LIMIT="off")

    refused = client.post("/vault/secret/create", json={"secret": b64(b"x")})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    wrong = client.post(
        "/vault/secret/create", json={"secret": b64(b"x")}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401
    created = client.post(
        "/vault/secret/create",
        json={"secret": b64(b"x")},
        headers={"Authorization": f"Bearer {ALICE}"},
    )
    assert created.status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200

    records = audit_records(store_env)
    assert [(r["status"], r["outcome"], r["api_key_name"]) for r in records] == [
        (401, "unauthorized", None),
        (401, "unauthorized", None),
        (200, "success", "alice"),
    ]
    assert ALICE not in repr(records)
    spec = client.get("/openapi.json").json()
    assert "401" in spec["paths"]["/vault/secret/create/"]["post"]["responses"]
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


def test_metrics_token_guards_metrics_only(make_client: Callable[..., TestClient]) -> None:
    client = make_client(METRICS_TOKEN="m" * 40)
    assert client.get("/metrics").status_code == 401
    assert (
        client.get("/metrics", headers={"Authorization": "Bearer " + "m" * 40}).status_code == 200
    )
    assert client.post("/vault/secret/create", json={"secret": b64(b"x")}).status_code == 200


def test_cli_sends_the_token_from_the_environment(
    start_server: Callable[..., ServerProcess], master_key: str, tmp_path: Path
) -> None:
    server = start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "d"), "API_KEYS": f"ci:{ALICE}"}
    )
    command = [sys.executable, "-m", "vault", "create", "--url", server.url, b64(b"cli")]
    without = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert without.returncode == 1
    assert "HTTP 401" in without.stderr
    with_token = subprocess.run(
        command,
        env=clean_env(SECRET_MANAGER_TOKEN=ALICE),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert with_token.returncode == 0, with_token.stderr
    assert "secret_id" in with_token.stdout


CREATOR = "creator-token-" + "c" * 32
FETCHER = "fetcher-token-" + "f" * 32


def test_a_key_without_the_scope_gets_403_is_audited_as_denied_and_changes_nothing(
    make_client: Callable[..., TestClient], store_env: dict[str, str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    # Both of the default tenant (one written with its prefix): a secret is its tenant's.
    keys.write_text(f"scribe-q7:{CREATOR}:create\ndefault/lector-q7:{FETCHER}:fetch+status\n")
    client = make_client(API_KEYS_FILE=str(keys), RATE_LIMIT="off")
    as_writer = {"Authorization": f"Bearer {CREATOR}"}
    as_reader = {"Authorization": f"Bearer {FETCHER}"}
    denied_before = {
        op: sample("vault_access_denied_total", op=op, reason="scope")
        for op in ("create", "fetch", "delete")
    }

    created = client.post(
        "/vault/secret/create", json={"secret": b64(b"x"), "max_reads": 1}, headers=as_writer
    )
    assert created.status_code == 200
    secret_id = created.json()["secret_id"]
    for op in ("fetch", "delete"):
        refused = client.post(
            f"/vault/secret/{op}", json={"secret_id": secret_id}, headers=as_writer
        )
        assert refused.status_code == 403
        assert refused.json()["detail"].startswith(f"this API key may not {op} secrets: ")
        assert refused.headers["www-authenticate"].endswith(f'scope="{op}"')
        assert refused.headers["cache-control"] == "no-store"  # the hygiene headers too
    refused = client.post("/vault/secret/create/", json={"secret": b64(b"y")}, headers=as_reader)
    assert refused.status_code == 403

    # Nothing changed: the one read the secret allows is still there.
    fetched = client.post("/vault/secret/fetch", json={"secret_id": secret_id}, headers=as_reader)
    assert fetched.status_code == 200
    assert fetched.json()["secret"] == b64(b"x")

    records = audit_records(store_env)
    assert [
        (r["op"], r["status"], r["outcome"], r["api_key_name"], r["secret_id_hmac"] is None)
        for r in records
    ] == [
        ("create", 200, "success", "scribe-q7", False),
        ("fetch", 403, "denied", "scribe-q7", True),  # refused before the body named an id
        ("delete", 403, "denied", "scribe-q7", True),
        ("create", 403, "denied", "lector-q7", True),
        ("fetch", 200, "success", "lector-q7", False),
    ]
    assert {r["tenant"] for r in records} == {"default"}
    assert {
        op: sample("vault_access_denied_total", op=op, reason="scope") - before
        for op, before in denied_before.items()
    } == {"create": 1, "fetch": 1, "delete": 1}
    exposition = client.get("/metrics").text
    assert "scribe-q7" not in exposition and "lector-q7" not in exposition
