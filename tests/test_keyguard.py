"""vault/keyguard.py and the key guard of ``serve``: a store holding records that no configured
key can open stops the server with one line, on both stores, unless the key was retired on
purpose; a serving app reports how many such records there are."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from tests.conftest import MongoWireServer, b64, clean_env, free_port, wait_until
from vault.app import create_app
from vault.crypto import generate_key, key_id, parse_key
from vault.keyguard import describe, refusal
from vault.settings import Settings

pytestmark = pytest.mark.slow

StartServer = Callable[..., Any]


def kid(key: str) -> str:
    return key_id(parse_key(key))


def create(client: TestClient, count: int) -> list[str]:
    ids = []
    for i in range(count):
        response = client.post("/vault/secret/create", json={"secret": b64(b"sealed %d" % i)})
        assert response.status_code == 200, response.text
        ids.append(response.json()["secret_id"])
    return ids


def run_serve(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """``serve`` expected to stop by itself; the port it was given, to check it is free."""
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "vault", "serve", "--port", str(port), *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, port


def assert_refused_before_serving(result: subprocess.CompletedProcess[str], port: int) -> str:
    """Exit 2 with exactly one line on stderr, and no server ever ran; returns the line."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Running on" not in result.stdout + result.stderr
    with socket.socket() as probe:  # nothing holds the port it was given
        probe.bind(("127.0.0.1", port))
    return lines[0]


def ready(url: str) -> dict[str, Any]:
    response = httpx.get(url + "/readyz", timeout=5)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def counted(url: str, expected: int) -> None:
    """Wait for /readyz to answer 200 with this count (null until first counted)."""

    def answers() -> bool:
        response = httpx.get(url + "/readyz", timeout=5)
        return response.status_code == 200 and response.json()["records_unreadable"] == expected

    wait_until(answers, 30, f"/readyz to count {expected} unreadable records")


def unreadable_metric(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("vault_records_unreadable "):
            return float(line.split()[1])
    raise AssertionError("vault_records_unreadable is not exported")


# --- the line ----------------------------------------------------------------------------


def test_the_line_names_each_key_id_its_records_and_the_fix() -> None:
    line = refusal(
        "SQLite file 'd/vault.db'",
        {"00000000000000bb": 1, "00000000000000aa": 3},
        ["ff00ff00ff00ff00"],
    )
    assert line == (
        "SQLite file 'd/vault.db' holds records no configured key can open: 3 records sealed by "
        "key 00000000000000aa, 1 record by key 00000000000000bb (configured key ids: "
        "ff00ff00ff00ff00); set MASTER_KEY_PREVIOUS to the key(s) that sealed them "
        "(comma-separated), or MASTER_KEY to the key this store was written with; to start "
        "anyway for a key retired on purpose, list its id in RETIRED_KEY_IDS"
    )
    assert describe({"00000000000000aa": 1}) == "1 record sealed by key 00000000000000aa"


# --- serve, on both stores ----------------------------------------------------------------


def test_serve_refuses_a_store_it_cannot_open_and_starts_with_the_right_keys(
    make_client: Callable[..., TestClient],
    store_env: dict[str, str],
    start_server: StartServer,
) -> None:
    lost = generate_key()
    create(make_client(MASTER_KEY=lost), 3)
    create(make_client(), 1)  # sealed by store_env's MASTER_KEY: not reported

    result, port = run_serve(store_env)

    line = assert_refused_before_serving(result, port)
    assert line.startswith("secret-manager: ")
    assert f"3 records sealed by key {kid(lost)}" in line
    assert kid(store_env["MASTER_KEY"]) in line  # the configured ids, to compare with
    assert "set MASTER_KEY_PREVIOUS to the key(s) that sealed them" in line
    assert "RETIRED_KEY_IDS" in line
    assert lost not in result.stdout + result.stderr and store_env["MASTER_KEY"] not in line

    # The fix the line names: the key that sealed them as a previous key.
    server = start_server({**store_env, "MASTER_KEY_PREVIOUS": lost})
    counted(server.url, 0)
    assert unreadable_metric(server.url) == 0


def test_retired_key_ids_let_serve_start_and_the_count_is_reported(
    make_client: Callable[..., TestClient],
    store_env: dict[str, str],
    start_server: StartServer,
) -> None:
    retired = generate_key()
    create(make_client(MASTER_KEY=retired), 2)
    env = {**store_env, "RETIRED_KEY_IDS": kid(retired), "SECRET_PURGE_INTERVAL_SECONDS": "1"}

    server = start_server(env)

    counted(server.url, 2)
    assert ready(server.url)["status"] == "ready"
    assert unreadable_metric(server.url) == 2
    assert f"2 records sealed by key {kid(retired)} (RETIRED_KEY_IDS)" in server.output()
    # Records a replica with yet another key writes while this one serves are counted too.
    create(make_client(MASTER_KEY=generate_key()), 1)
    counted(server.url, 3)
    assert unreadable_metric(server.url) == 3
    assert server.stop() == 0

    # The opt-out covers exactly the ids listed: the one written since stops a new start.
    result, port = run_serve(env)
    line = assert_refused_before_serving(result, port)
    assert "1 record sealed by key" in line
    assert kid(retired) not in line


def test_dev_with_its_key_file_deleted_refuses_and_writes_no_new_key(
    store_env: dict[str, str], start_server: StartServer
) -> None:
    env = {k: v for k, v in store_env.items() if k != "MASTER_KEY"}
    key_file = Path(env["DATA_DIR"]) / "master.key"
    first = start_server(env, "--dev")
    for i in range(2):
        response = httpx.post(
            first.url + "/vault/secret/create", json={"secret": b64(b"%d" % i)}, timeout=10
        )
        assert response.status_code == 200, response.text
    assert first.stop() == 0
    old_kid = kid(key_file.read_text().strip())
    key_file.unlink()

    result, port = run_serve(env, "--dev")

    line = assert_refused_before_serving(result, port)
    assert f"--dev found no key file {str(key_file)!r}" in line
    assert f"2 records sealed by key {old_kid}" in line
    assert "restore that master.key" in line
    assert not key_file.exists()


def test_dev_on_an_empty_data_dir_still_generates_its_key(
    tmp_path: Path, start_server: StartServer
) -> None:
    data_dir = tmp_path / "fresh"
    server = start_server({"DATA_DIR": str(data_dir)}, "--dev")
    assert (data_dir / "master.key").exists()
    counted(server.url, 0)


def test_a_store_down_at_start_is_checked_once_it_answers(
    own_mongo: MongoWireServer,
    tmp_path: Path,
    start_server: StartServer,
) -> None:
    lost, key = generate_key(), generate_key()
    env = {
        "MONGO_URI": own_mongo.uri,
        "MONGO_DB": "guard",
        "DATA_DIR": str(tmp_path / "data"),
        "STORE_TIMEOUT_SECONDS": "1",
        "SECRET_PURGE_INTERVAL_SECONDS": "1",
    }
    with TestClient(create_app(Settings.from_env({**env, "MASTER_KEY": lost}))) as client:
        create(client, 2)
    own_mongo.stop()

    server = start_server({**env, "MASTER_KEY": key})

    assert "key check not run: the store could not be asked" in server.output()
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 503
    own_mongo.start()
    counted(server.url, 2)
    assert unreadable_metric(server.url) == 2


def test_every_worker_counts_the_same_store_and_the_metric_shows_it_once(
    tmp_path: Path, start_server: StartServer
) -> None:
    retired, key = generate_key(), generate_key()
    env = {"DATA_DIR": str(tmp_path / "data"), "MASTER_KEY": retired}
    with TestClient(create_app(Settings.from_env(env))) as client:
        create(client, 2)

    server = start_server(
        {**env, "MASTER_KEY": key, "RETIRED_KEY_IDS": kid(retired)}, "--workers", "2"
    )

    counted(server.url, 2)
    # Both workers report 2 (livemax), not their sum: scrape a few times, whichever answers.
    for _ in range(5):
        assert unreadable_metric(server.url) == 2
