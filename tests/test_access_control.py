"""Access control end to end, on real server processes: scopes, tenants and readers, on
both stores, across two replicas and two workers, and records edited in the database.

The keys (API_KEYS_FILE): acme/ci makes the secrets (every scope), acme/billing reads
(fetch and delete), acme/web is another key of the same tenant (every scope), acme/deploy
may only create, beta/billing is a key of another tenant with a name acme also uses, and
plain is a key of the default tenant written as before tenants existed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pymongo
import pytest

from tests.conftest import RawRecords, ServerProcess, b64, wait_until
from tests.test_audit import audit_records
from vault.records import record_key

pytestmark = pytest.mark.slow

TOKENS = {
    "acme/ci": "ci-" + "c" * 40,
    "acme/billing": "billing-" + "b" * 40,
    "acme/web": "web-" + "w" * 40,
    "acme/deploy": "deploy-" + "d" * 40,
    "beta/billing": "beta-" + "e" * 40,
    "plain": "plain-" + "p" * 40,
}
SCOPES = {"acme/billing": "fetch+delete", "acme/deploy": "create"}
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"


def key_file(directory: Path) -> Path:
    path = directory / "api_keys"
    lines = ["# tenants and scopes"]
    for name, token in TOKENS.items():
        scopes = SCOPES.get(name)
        lines.append(f"{name}:{token}" + (f":{scopes}" if scopes else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def guarded_env(store_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**store_env, "API_KEYS_FILE": str(key_file(tmp_path)), "RATE_LIMIT": "off"}


def call(server: ServerProcess, op: str, body: dict[str, Any], key: str | None) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {TOKENS[key]}"}
    return httpx.post(f"{server.url}/vault/secret/{op}", json=body, headers=headers, timeout=10)


def create(server: ServerProcess, key: str = "acme/ci", **fields: Any) -> str:
    answer = call(server, "create", {"secret": b64(b"for billing"), **fields}, key)
    assert answer.status_code == 200, answer.text
    secret_id: str = answer.json()["secret_id"]
    return secret_id


def comparable(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    """What a caller can compare between two answers: status, body, headers but the ids."""
    headers = sorted(
        (name, value)
        for name, value in response.headers.items()
        if name not in ("x-request-id", "x-server-request-id", "date")
    )
    return response.status_code, response.content, headers


def test_each_scope_allows_its_operation_and_nothing_else(
    start_server: Callable[..., ServerProcess], guarded_env: dict[str, str]
) -> None:
    server = start_server(guarded_env)
    # acme/deploy: create only.
    secret_id = create(server, "acme/deploy", max_reads=3)
    for op in ("fetch", "delete"):
        refused = call(server, op, {"secret_id": secret_id}, "acme/deploy")
        assert refused.status_code == 403, refused.text
        assert f"may not {op}" in refused.json()["detail"]
    # acme/billing: fetch and delete, no create.
    refused = call(server, "create", {"secret": b64(b"x")}, "acme/billing")
    assert refused.status_code == 403 and "may not create" in refused.json()["detail"]
    fetched = call(server, "fetch", {"secret_id": secret_id}, "acme/billing")
    assert fetched.status_code == 200
    assert fetched.json()["reads_left"] == 2  # the 403s spent no read
    assert call(server, "delete", {"secret_id": secret_id}, "acme/billing").status_code == 200
    # A key written as before tenants and scopes: everything, in the default tenant.
    plain = create(server, "plain")
    assert call(server, "fetch", {"secret_id": plain}, "plain").json()["secret"] == b64(
        b"for billing"
    )
    assert call(server, "delete", {"secret_id": plain}, "plain").status_code == 200


def test_tenants_cannot_fetch_delete_or_detect_each_others_secrets(
    start_server: Callable[..., ServerProcess], guarded_env: dict[str, str]
) -> None:
    server = start_server(guarded_env)
    acme = create(server, "acme/ci", max_reads=1)
    plain = create(server, "plain")
    for secret_id, outsiders in ((acme, ["beta/billing", "plain"]), (plain, ["acme/web"])):
        for key in outsiders:
            for op in ("fetch", "delete"):
                refused = call(server, op, {"secret_id": secret_id}, key)
                unknown = call(server, op, {"secret_id": UNKNOWN_ID}, key)
                assert comparable(refused) == comparable(unknown), (key, op)
                assert refused.status_code == 404
    # Nothing was spent or removed: the one read is still there for the owner's tenant.
    assert call(server, "fetch", {"secret_id": acme}, "acme/web").status_code == 200
    assert call(server, "fetch", {"secret_id": plain}, "plain").status_code == 200


def test_readers_alone_fetch_and_the_owner_or_a_reader_deletes(
    start_server: Callable[..., ServerProcess], guarded_env: dict[str, str]
) -> None:
    server = start_server(guarded_env)
    answer = call(
        server, "create", {"secret": b64(b"s"), "readers": ["billing"], "max_reads": 2}, "acme/ci"
    )
    assert answer.status_code == 200
    assert set(answer.json()) == {"secret_id", "reads_left", "readers"}
    assert answer.json()["readers"] == ["billing"]
    secret_id = answer.json()["secret_id"]
    body = {"secret_id": secret_id}
    unknown = comparable(call(server, "fetch", {"secret_id": UNKNOWN_ID}, "acme/web"))
    for key in ("acme/ci", "acme/web", "beta/billing"):  # the owner is no reader
        assert comparable(call(server, "fetch", body, key)) == unknown, key
    fetched = call(server, "fetch", body, "acme/billing")
    assert fetched.status_code == 200
    assert fetched.json() == {"secret": b64(b"s"), "reads_left": 1, "readers": ["billing"]}
    for key in ("acme/web", "beta/billing"):
        assert call(server, "delete", body, key).status_code == 404, key
    assert call(server, "delete", body, "acme/ci").status_code == 200  # the owner
    assert call(server, "fetch", body, "acme/billing").status_code == 404
    other = create(server, readers=["billing", "web"])
    assert call(server, "delete", {"secret_id": other}, "acme/billing").status_code == 200


def test_reader_names_must_be_keys_of_the_creators_tenant(
    start_server: Callable[..., ServerProcess], guarded_env: dict[str, str]
) -> None:
    server = start_server(guarded_env)
    for readers, named in (
        (["billing", "bliling"], "'bliling'"),
        (["ci", "plain"], "'plain'"),  # the default tenant's, not acme's
        (["acme/billing"], "'acme/billing'"),  # no tenant prefix
    ):
        refused = call(server, "create", {"secret": b64(b"s"), "readers": readers}, "acme/ci")
        assert refused.status_code == 400, readers
        assert named in refused.json()["detail"], refused.text
    for readers in ([], ["billing", "billing"], "billing", [1], ["x" * 65]):
        refused = call(server, "create", {"secret": b64(b"s"), "readers": readers}, "acme/ci")
        assert refused.status_code == 400, readers
    # beta's billing is beta's own key: a name is looked up in the creator's tenant.
    beta = call(server, "create", {"secret": b64(b"s"), "readers": ["billing"]}, "beta/billing")
    assert beta.status_code == 200
    body = {"secret_id": beta.json()["secret_id"]}
    assert call(server, "fetch", body, "acme/billing").status_code == 404
    assert call(server, "fetch", body, "beta/billing").status_code == 200


def test_readers_need_api_keys(
    start_server: Callable[..., ServerProcess], store_env: dict[str, str]
) -> None:
    server = start_server(store_env)
    refused = call(server, "create", {"secret": b64(b"s"), "readers": ["billing"]}, None)
    assert refused.status_code == 400 and "API_KEYS_FILE" in refused.json()["detail"]
    plain = call(server, "create", {"secret": b64(b"s")}, None)
    assert set(plain.json()) == {"secret_id"}  # nothing new without readers


def _readers_hold(servers: list[ServerProcess]) -> None:
    """Secrets made on either process, refused and read on both: reads exact across them."""
    made = [create(servers[k % 2], readers=["billing"], max_reads=4) for k in range(6)]
    for k, secret_id in enumerate(made):
        body = {"secret_id": secret_id}
        for server in servers:  # every process refuses the others, and spends nothing
            assert call(server, "fetch", body, "acme/web").status_code == 404
            assert call(server, "delete", body, "beta/billing").status_code == 404
        reads = [call(servers[(k + j) % 2], "fetch", body, "acme/billing") for j in range(4)]
        assert [r.json()["reads_left"] for r in reads] == [3, 2, 1, 0]
        assert call(servers[k % 2], "fetch", body, "acme/billing").status_code == 404


def test_readers_hold_across_two_workers(
    start_server: Callable[..., ServerProcess], guarded_env: dict[str, str]
) -> None:
    server = start_server(guarded_env, "--workers", "2")
    _readers_hold([server, server])


def test_readers_hold_across_two_replicas(
    start_replicas: Callable[..., Any], tmp_path: Path
) -> None:
    servers, _ = start_replicas(API_KEYS_FILE=str(key_file(tmp_path)))
    _readers_hold(servers)


def test_refusals_are_audited_as_denied_and_counted_without_names(
    start_server: Callable[..., ServerProcess], guarded_env: dict[str, str]
) -> None:
    server = start_server({**guarded_env, "METRICS_ENABLED": "true"})
    secret_id = create(server, readers=["billing"])
    body = {"secret_id": secret_id}
    assert call(server, "fetch", body, "acme/deploy").status_code == 403  # scope
    assert call(server, "fetch", body, "beta/billing").status_code == 404  # tenant
    assert call(server, "delete", body, "acme/web").status_code == 404  # readers
    assert call(server, "fetch", body, "acme/billing").status_code == 200
    rows = audit_records(guarded_env)
    seen = [(r["op"], r["status"], r["outcome"], r["tenant"], r["api_key_name"]) for r in rows]
    assert seen == [
        ("create", 200, "success", "acme", "ci"),
        ("fetch", 403, "denied", "acme", "deploy"),
        ("fetch", 404, "denied", "beta", "billing"),
        ("delete", 404, "denied", "acme", "web"),
        ("fetch", 200, "success", "acme", "billing"),
    ]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    for op, reason in (("fetch", "scope"), ("fetch", "tenant"), ("delete", "readers")):
        line = f'vault_access_denied_total{{op="{op}",reason="{reason}"}} 1.0'
        assert line in metrics, [m for m in metrics.splitlines() if "denied" in m]
    assert secret_id not in metrics and "billing" not in metrics


@pytest.mark.parametrize(
    "edit",
    [{"tenant": "beta"}, {"readers": ["billing", "web"]}, {"owner": "web"}],
    ids=["tenant", "readers", "owner"],
)
def test_a_record_edited_in_the_database_is_not_served(
    start_server: Callable[..., ServerProcess],
    guarded_env: dict[str, str],
    raw_records: RawRecords,
    edit: dict[str, Any],
) -> None:
    server = start_server(guarded_env)
    secret_id = create(server, readers=["billing"])
    key = record_key(secret_id)
    if raw_records.kind == "sqlite":
        column, value = next(iter(edit.items()))
        value = f'["{value[0]}", "{value[1]}"]' if isinstance(value, list) else value
        with sqlite3.connect(Path(guarded_env["DATA_DIR"]) / "vault.db") as conn:
            update = f"UPDATE secrets SET {column} = ? WHERE record_key = ?"  # noqa: S608
            conn.execute(update, (value, key))
    else:
        with pymongo.MongoClient(guarded_env["MONGO_URI"]) as client:
            client[guarded_env["MONGO_DB"]]["secrets"].update_one({"_id": key}, {"$set": edit})
    # Whoever the edit would let in gets a 500, never the secret; nobody gets a 200.
    let_in = {"tenant": "beta/billing", "readers": "acme/web", "owner": "acme/billing"}
    answer = call(server, "fetch", {"secret_id": secret_id}, let_in[next(iter(edit))])
    assert answer.status_code == 500, answer.text
    assert b64(b"for billing") not in answer.text
    for caller in ("beta/billing", "acme/web", "acme/billing"):
        assert call(server, "fetch", {"secret_id": secret_id}, caller).status_code in (404, 500)
    wait_until(
        lambda: httpx.get(server.url + "/readyz", timeout=5).json()["records_unreadable"] >= 1,
        10,
        "the edited record to be counted unreadable",
    )


def test_without_api_keys_nothing_changes(
    start_server: Callable[..., ServerProcess], store_env: dict[str, str]
) -> None:
    server = start_server(store_env)
    created = call(server, "create", {"secret": b64(b"x")}, None).json()
    assert set(created) == {"secret_id"}
    body = {"secret_id": created["secret_id"]}
    assert call(server, "fetch", body, None).json() == {"secret": b64(b"x")}
    assert call(server, "delete", body, None).json() == {**body, "deleted": True}
