"""Key scopes and revocation on the real server: ``secret-manager serve`` with API_KEYS_FILE,
re-read on SIGHUP by the one process or by every worker, under load too."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import ServerProcess, b64, wait_until

pytestmark = pytest.mark.slow

StartServer = Callable[..., ServerProcess]

CREATOR = "creator-token-" + "c" * 32
OPS = "ops-token-" + "o" * 32
GONE = "gone-token-" + "g" * 32
TOKENS = (CREATOR, OPS, GONE)
CREATE = "/vault/secret/create"
FETCH = "/vault/secret/fetch"
RELOADED = "API_KEYS_FILE re-read: "
REQUESTS = 400  # under load: the threads send these, as fast as the server answers
NOT_RELOADED = "API_KEYS_FILE not re-read, "


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def messages(server: ServerProcess) -> list[str]:
    """The message of every JSON log line the server has written so far."""
    found = []
    for line in server.output().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("message"), str):
            found.append(entry["message"])
    return found


def reload_lines(server: ServerProcess, start: str) -> list[str]:
    return [message for message in messages(server) if message.startswith(start)]


def process_of(line: str) -> str:
    """The pid a reload line names (``process 1234``)."""
    return line.split("process ", 1)[1].split(")", 1)[0].split(";", 1)[0]


def sighup_and_wait(server: ServerProcess, start: str, expected: int, timeout: float) -> float:
    """SIGHUP the server; wait until ``expected`` reload lines beginning with ``start`` are
    logged in all; the seconds that took."""
    sent = time.monotonic()
    server.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: len(reload_lines(server, start)) >= expected,
        timeout,
        f"{expected} lines {start!r} after SIGHUP",
    )
    return time.monotonic() - sent


def status(url: str, path: str, token: str, body: dict[str, object]) -> int:
    """One request on a connection of its own (with several workers, any of them takes it)."""
    return httpx.post(url + path, json=body, headers=bearer(token), timeout=10).status_code


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api_keys"
    path.write_text(f"# who may call\ncreator:{CREATOR}:create\nops:{OPS}\nacme/gone:{GONE}\n")
    return path


@pytest.fixture
def server_env(master_key: str, tmp_path: Path, key_file: Path) -> dict[str, str]:
    return {
        "MASTER_KEY": master_key,
        "DATA_DIR": str(tmp_path / "data"),
        "API_KEYS_FILE": str(key_file),
        "RATE_LIMIT": "off",
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_scopes_and_a_revocation_by_sighup_on_every_worker(
    start_server: StartServer, server_env: dict[str, str], key_file: Path, workers: int
) -> None:
    server = start_server(server_env, "--workers", str(workers))
    url = server.url

    # A create-only key creates; its fetch is refused before anything is read or changed.
    created = httpx.post(
        url + CREATE,
        json={"secret": b64(b"payroll"), "max_reads": 1},
        headers=bearer(CREATOR),
        timeout=10,
    )
    assert created.status_code == 200
    secret_id = created.json()["secret_id"]
    refused = httpx.post(
        url + FETCH, json={"secret_id": secret_id}, headers=bearer(CREATOR), timeout=10
    )
    assert refused.status_code == 403
    assert refused.json()["detail"].startswith("this API key may not fetch secrets: ")
    assert status(url, CREATE, GONE, {"secret": b64(b"x")}) == 200

    # Revoke a key: every worker re-reads the file, and the key is refused within a second.
    key_file.write_text(f"creator:{CREATOR}:create\nops:{OPS}\n")
    took = sighup_and_wait(server, RELOADED, workers, timeout=5)
    assert took < 1.0, f"the workers took {took:.2f}s to re-read the key file"
    lines = reload_lines(server, RELOADED)
    assert len(lines) == workers
    assert len({process_of(line) for line in lines}) == workers  # each worker, once
    assert all(
        line.startswith(f"{RELOADED}2 keys in force (0 added, 1 removed, 0 changed;")
        for line in lines
    )
    assert [status(url, CREATE, GONE, {"secret": b64(b"x")}) for _ in range(10)] == [401] * 10
    assert [status(url, CREATE, CREATOR, {"secret": b64(b"x")}) for _ in range(4)] == [200] * 4

    # A file that does not parse: the keys in force stay, one line per worker says why.
    key_file.write_text(f"ops:{OPS}\ncreator:{CREATOR}:create+reed\n")
    sighup_and_wait(server, NOT_RELOADED, workers, timeout=5)
    time.sleep(0.3)  # room for a line too many
    failures = reload_lines(server, NOT_RELOADED)
    assert len(failures) == workers
    assert len({process_of(line) for line in failures}) == workers
    for line in failures:
        assert line.startswith(f"{NOT_RELOADED}the 2 keys in force stay (process ")
        assert line.endswith(
            "API_KEYS_FILE line 2: scope 2 of 2 after the second ':' is not a scope; scopes "
            "are create, fetch, delete, status, joined by '+' after a second ':' "
            "(name:token:create+delete); leave out ':scopes' for all of them"
        )
    assert [status(url, CREATE, CREATOR, {"secret": b64(b"x")}) for _ in range(4)] == [200] * 4
    assert [status(url, CREATE, GONE, {"secret": b64(b"x")}) for _ in range(4)] == [401] * 4

    # Nothing the 403 touched: the secret's one read is still there, for a key with fetch.
    fetched = httpx.post(
        url + FETCH, json={"secret_id": secret_id}, headers=bearer(OPS), timeout=10
    )
    assert fetched.status_code == 200
    assert fetched.json()["secret"] == b64(b"payroll")

    assert server.stop() == 0
    output = server.output()
    for token in TOKENS:
        assert token not in output


def test_sighup_with_keys_from_the_environment_says_there_is_nothing_to_re_read(
    start_server: StartServer, server_env: dict[str, str]
) -> None:
    env = {key: value for key, value in server_env.items() if key != "API_KEYS_FILE"}
    server = start_server({**env, "API_KEYS": f"ops:{OPS}"})
    sighup_and_wait(server, "SIGHUP: the API keys come from API_KEYS", 1, timeout=5)
    assert status(server.url, CREATE, OPS, {"secret": b64(b"x")}) == 200
    assert server.stop() == 0


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_under_load_fails_no_request_of_a_key_it_keeps(
    start_server: StartServer,
    server_env: dict[str, str],
    key_file: Path,
    pool: ThreadPoolExecutor,
    workers: int,
) -> None:
    server = start_server(server_env, "--workers", str(workers))
    local = threading.local()
    opened: list[httpx.Client] = []

    def create(n: int) -> str:
        # Each thread keeps its connection alive, as a client under load would.
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=server.url, timeout=20)
            opened.append(local.client)
        try:
            response = local.client.post(
                CREATE, json={"secret": b64(n.to_bytes(4, "big"))}, headers=bearer(OPS)
            )
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return str(response.status_code)

    futures = [pool.submit(create, n) for n in range(REQUESTS)]
    pending_at_sighup = []
    try:
        # Five re-reads while the requests run, the other key revoked and restored in turn.
        for round_number in range(1, 6):
            wait_until(
                lambda: sum(f.done() for f in futures) >= 30 * round_number,  # noqa: B023
                60,
                "requests to run",
            )
            gone = "" if round_number % 2 else f"acme/gone:{GONE}\n"
            key_file.write_text(f"creator:{CREATOR}:create\nops:{OPS}\n{gone}")
            pending_at_sighup.append(sum(not f.done() for f in futures))
            sighup_and_wait(server, RELOADED, workers * round_number, timeout=5)
        outcomes = Counter(future.result() for future in futures)
    finally:
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)
        for client in opened:
            client.close()
    assert all(pending_at_sighup), pending_at_sighup  # every re-read happened under load
    assert outcomes == {"200": REQUESTS}
    assert len(reload_lines(server, RELOADED)) == 5 * workers
    assert reload_lines(server, NOT_RELOADED) == []
    # The last file left the revoked key out.
    assert status(server.url, CREATE, GONE, {"secret": b64(b"x")}) == 401
    assert server.stop() == 0
