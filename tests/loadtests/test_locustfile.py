"""The Locust scenarios run headless against real servers: the CI gate, and gates that fail.

Locust runs only in subprocesses: importing it would monkey-patch this process with gevent.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx2 as httpx
import pytest

from tests.conftest import ROOT, ServerProcess, clean_env
from tests.loadtests.conftest import JSONHandler, stand_in_server

pytestmark = pytest.mark.slow

StartServer = Callable[..., ServerProcess]

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
ALL_USERS = ("RoundtripUser", "CreateBurstUser", "ReadHeavyUser", "OneTimeUser", "NegativeUser")
NEGATIVE_NAMES = {
    "create (invalid base64)",
    "create (invalid max_reads)",
    "create (malformed JSON)",
    "create (oversized)",
    "delete (unknown id)",
    "fetch (malformed JSON)",
    "fetch (malformed id)",
    "fetch (unknown id)",
}
# ReadHeavyUser's delete task and OneTimeUser: each step's request name, in order.
DELETE_STEPS = ("create (to delete)", "delete", "fetch (deleted)")
ONE_TIME_STEPS = ("create (max_reads 1)", "fetch (max_reads 1)", "fetch (used up)")
RATE_LIMITED = "rate limited: start the server with RATE_LIMIT=off"
UNKNOWN_ID_DETAIL = "no secret has this secret_id; check the id you were given"


@dataclass
class LocustRun:
    returncode: int
    output: str
    csv_stats: dict[str, dict[str, str]]  # *_stats.csv rows by Name (written every second)
    final: dict[str, dict[str, Any]]  # the --json-file entries by name (the final counts)
    failures: list[dict[str, str]]  # *_failures.csv rows
    acks: list[tuple[str, str]]  # (secret_id, sha256 hex) lines of LOADTEST_ACK_FILE

    def requests(self, name: str) -> int:
        return int(self.csv_stats[name]["Request Count"])

    def failed(self, name: str) -> int:
        return int(self.csv_stats[name]["Failure Count"])

    def succeeded(self, name: str) -> int:
        """Requests named ``name`` that passed, from the final counts."""
        entry = self.final.get(name)
        return 0 if entry is None else int(entry["num_requests"]) - int(entry["num_failures"])

    def acknowledged_creates(self) -> int:
        return self.succeeded("create")


def explain(run: LocustRun, server: ServerProcess) -> str:
    """What to read when a run did not go as expected: Locust's failures and both logs."""
    return (
        f"failures: {run.failures}\n--- locust output\n{run.output[-4000:]}"
        f"\n--- server output\n{server.output()[-4000:]}"
    )


def run_locust(
    tmp_path: Path, url: str, *args: str, users: int, seconds: int, **env: str
) -> LocustRun:
    """Run loadtests/locustfile.py headless against ``url``; its exit code and its reports."""
    run_dir = tmp_path / f"locust-{uuid.uuid4().hex[:8]}"
    run_dir.mkdir()
    ack_file = run_dir / "acks.txt"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
        # Users finish the task in hand, so every create the server counts gets its answer.
        "--stop-timeout", "5s",
        "--host", url,
        "--csv", str(run_dir / "run"), "--json-file", str(run_dir / "final"),
        *args,
    ]  # fmt: skip
    completed = subprocess.run(
        command,
        cwd=run_dir,
        env=clean_env(LOADTEST_ACK_FILE=str(ack_file), **env),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    with (run_dir / "run_stats.csv").open(newline="") as handle:
        csv_stats = {row["Name"]: row for row in csv.DictReader(handle)}
    with (run_dir / "run_failures.csv").open(newline="") as handle:
        failures = list(csv.DictReader(handle))
    final = {entry["name"]: entry for entry in json.loads((run_dir / "final.json").read_text())}
    acks = []
    if ack_file.exists():
        for line in ack_file.read_text().splitlines():
            secret_id, digest = line.split(" ")
            acks.append((secret_id, digest))
    return LocustRun(
        completed.returncode,
        completed.stdout + completed.stderr,
        csv_stats,
        final,
        failures,
        acks,
    )


def fetch(url: str, secret_id: str) -> bytes:
    response = httpx.post(url + "/vault/secret/fetch", json={"secret_id": secret_id}, timeout=10)
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["secret"], validate=True)


def metric(url: str, series: str) -> float:
    """The value of one series (name and labels, as exposed) on the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not in /metrics"
    return float(match.group(1))


def created_total(url: str) -> float:
    return metric(url, "vault_secrets_created_total")


def deleted_total(url: str, reason: str) -> float:
    return metric(url, f'vault_secrets_deleted_total{{reason="{reason}"}}')


def server_env(master_key: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "MASTER_KEY": master_key,
        "DATA_DIR": str(tmp_path / f"data-{uuid.uuid4().hex[:8]}"),
        "RATE_LIMIT": "off",
        **extra,
    }


def test_ci_gate_all_five_scenarios_without_failures(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    server = start_server(server_env(master_key, tmp_path))
    run = run_locust(tmp_path, server.url, *ALL_USERS, users=10, seconds=10)

    assert run.returncode == 0, explain(run, server)
    assert "load test passed" in run.output
    assert run.requests("create") > 0
    assert run.requests("fetch") > 0
    assert all(run.requests(name) > 0 for name in NEGATIVE_NAMES), run.csv_stats.keys()
    assert run.failed("Aggregated") == 0, explain(run, server)
    assert run.failures == []
    # Users finish the task in hand: every secret deleted or read once was then found gone.
    for steps in (DELETE_STEPS, ONE_TIME_STEPS):
        assert len({run.succeeded(name) for name in steps}) == 1, run.final.keys()
        assert run.succeeded(steps[0]) > 0, steps

    # One ack line per acknowledged create, and nothing the server stored is missing from it.
    ids = [secret_id for secret_id, _ in run.acks]
    assert len(ids) == run.acknowledged_creates() > 0
    assert len(set(ids)) == len(ids)
    deleted, read_up = run.succeeded("delete"), run.succeeded("fetch (max_reads 1)")
    assert created_total(server.url) == len(ids) + deleted + read_up
    # The secrets deleted or read up are the ones the server counts as gone, and no others.
    assert deleted_total(server.url, "request") == deleted
    assert deleted_total(server.url, "last_read") == read_up
    for secret_id, digest in random.sample(run.acks, min(50, len(run.acks))):
        assert hashlib.sha256(fetch(server.url, secret_id)).hexdigest() == digest


def test_with_secret_manager_token_the_scenarios_run_against_a_server_with_api_keys(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    token = "t" * 40
    server = start_server(server_env(master_key, tmp_path, API_KEYS=f"load:{token}"))
    users = ("RoundtripUser", "NegativeUser")
    run = run_locust(tmp_path, server.url, *users, users=4, seconds=5, SECRET_MANAGER_TOKEN=token)
    assert run.returncode == 0, explain(run, server)
    assert run.requests("create") > 0 and run.failed("Aggregated") == 0, explain(run, server)
    assert all(run.requests(name) > 0 for name in NEGATIVE_NAMES)  # their statuses, not 401s
    refused = run_locust(tmp_path, server.url, "RoundtripUser", users=2, seconds=3)
    assert refused.returncode != 0
    assert refused.failed("create") == refused.requests("create") > 0  # 401 without a key


def test_p95_over_the_limit_fails_the_run(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    server = start_server(server_env(master_key, tmp_path))
    run = run_locust(
        tmp_path, server.url, "--max-p95-ms", "0.001", "RoundtripUser", users=2, seconds=3
    )

    assert run.returncode == 1, explain(run, server)
    assert "is over --max-p95-ms 0.001" in run.output
    assert run.requests("create") > 0
    assert run.failed("Aggregated") == 0, explain(run, server)  # latency alone failed it


def test_a_server_that_breaks_the_contract_fails_the_run(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    # Most random secrets (1..4096 bytes) are over this limit and get 413 instead of 200.
    server = start_server(server_env(master_key, tmp_path, MAX_SECRET_BYTES="100"))
    run = run_locust(tmp_path, server.url, "RoundtripUser", users=4, seconds=3)

    assert run.returncode == 1, explain(run, server)
    assert "requests failed" in run.output
    assert run.failed("create") > 0
    assert {row["Name"] for row in run.failures} == {"create"}
    assert all("expected HTTP 200, got 413" in row["Error"] for row in run.failures)
    # Only the creates answered 200 are acknowledged, and they round-trip.
    assert len(run.acks) == run.acknowledged_creates() == created_total(server.url)
    for secret_id, digest in run.acks[:20]:
        plaintext = fetch(server.url, secret_id)
        assert len(plaintext) <= 100
        assert hashlib.sha256(plaintext).hexdigest() == digest


def test_negative_requests_get_their_documented_statuses(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    server = start_server(server_env(master_key, tmp_path))
    run = run_locust(tmp_path, server.url, "NegativeUser", users=5, seconds=5)

    assert run.returncode == 0, explain(run, server)
    assert set(run.csv_stats) == NEGATIVE_NAMES | {"Aggregated"}
    for name in NEGATIVE_NAMES:
        assert run.requests(name) > 0, name
        assert run.failed(name) == 0, name
    assert run.acks == []
    assert created_total(server.url) == 0


def test_an_oversized_secret_the_server_accepts_is_a_failure_and_acknowledged(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    # The server takes 65536 bytes, but the run is told the limit is 100: 101 bytes get 200.
    server = start_server(server_env(master_key, tmp_path))
    run = run_locust(
        tmp_path,
        server.url,
        "--max-secret-bytes", "100", "NegativeUser",
        users=2, seconds=3,
    )  # fmt: skip

    assert run.returncode == 1, explain(run, server)
    assert run.failed("create (oversized)") > 0
    assert {row["Name"] for row in run.failures} == {"create (oversized)"}
    assert "expected HTTP 413, got 200" in run.failures[0]["Error"]
    # The server acknowledged them, so the loss check must know of them.
    assert len(run.acks) == created_total(server.url) > 0
    secret_id, digest = run.acks[0]
    plaintext = fetch(server.url, secret_id)
    assert len(plaintext) == 101
    assert hashlib.sha256(plaintext).hexdigest() == digest


def test_users_whose_tasks_crash_fail_the_run(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    # A mistyped tag leaves every user without a task: each one raises, nothing is sent.
    server = start_server(server_env(master_key, tmp_path))
    run = run_locust(tmp_path, server.url, "--tags", "roundtrp", users=2, seconds=2)

    assert run.returncode == 1, explain(run, server)
    assert "exceptions in the users' tasks" in run.output
    assert run.failed("Aggregated") == 0  # no request failed: the crashes alone fail it


def test_a_rate_limited_run_fails_and_says_why(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    server = start_server(server_env(master_key, tmp_path, RATE_LIMIT="5/second"))
    run = run_locust(tmp_path, server.url, "CreateBurstUser", users=2, seconds=3)

    assert run.returncode == 1, explain(run, server)
    assert set(run.csv_stats) == {"create", "Aggregated"}
    assert run.failed("create") > 0
    assert any(RATE_LIMITED in row["Error"] for row in run.failures), run.failures


class BitFlippingVault(JSONHandler):
    """A stand-in server that keeps the contract's shapes but hands back one wrong bit."""

    stored: ClassVar[dict[str, bytes]] = {}

    def do_POST(self) -> None:
        body = self.json_body()
        if self.path.startswith("/vault/secret/create"):
            secret_id = str(uuid.uuid4())
            self.stored[secret_id] = base64.b64decode(body["secret"])
            answer = {"secret_id": secret_id}
        else:
            plaintext = bytearray(self.stored[body["secret_id"]])
            plaintext[-1] ^= 1
            answer = {"secret": base64.b64encode(plaintext).decode()}
        self.answer(200, answer)


@pytest.fixture
def bit_flipping_server() -> Iterator[str]:
    with stand_in_server(BitFlippingVault) as url:
        yield url


def test_a_wrong_byte_fails_the_run(bit_flipping_server: str, tmp_path: Path) -> None:
    run = run_locust(tmp_path, bit_flipping_server, "RoundtripUser", users=2, seconds=3)

    assert run.returncode == 1, run.output
    assert run.failed("fetch") == run.requests("fetch") > 0
    assert run.failed("create") == 0
    assert {row["Name"] for row in run.failures} == {"fetch"}
    # One row: one bit flipped keeps the length, and no size or byte is in the message.
    assert [row["Error"] for row in run.failures] == [
        "CatchResponseError('fetch: a different secret came back (same length)')"
    ]


def test_one_time_secrets_are_read_once_then_gone(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    server = start_server(server_env(master_key, tmp_path))
    run = run_locust(tmp_path, server.url, "OneTimeUser", users=4, seconds=4)

    assert run.returncode == 0, explain(run, server)
    assert set(run.csv_stats) == {*ONE_TIME_STEPS, "Aggregated"}
    assert run.failed("Aggregated") == 0, explain(run, server)
    created = run.succeeded("create (max_reads 1)")
    assert created > 0
    assert run.succeeded("fetch (max_reads 1)") == run.succeeded("fetch (used up)") == created
    # None of them is meant to survive the run, so none is acknowledged for a loss check...
    assert run.acks == []
    # ...and the server burnt each on its one read.
    assert created_total(server.url) == deleted_total(server.url, "last_read") == created


class UndeadVault(JSONHandler):
    """A stand-in server with the lifecycle's shapes that never forgets a secret: a second
    read of a one-time secret, or a fetch after a delete, still gets it back. With
    ``gone_detail`` set it forgets them, but its 404 says why (an oracle)."""

    stored: ClassVar[dict[str, dict[str, Any]]] = {}  # the fetch answers, by id
    gone: ClassVar[set[str]] = set()
    gone_detail: ClassVar[str | None] = None

    def do_POST(self) -> None:
        body = self.json_body()
        status = 200
        answer: dict[str, Any] = {}
        if self.path.startswith("/vault/secret/create"):
            secret_id = str(uuid.uuid4())
            answer = {"secret_id": secret_id}
            self.stored[secret_id] = {"secret": body["secret"]}
            if "max_reads" in body:
                answer["reads_left"] = body["max_reads"]
                self.stored[secret_id]["reads_left"] = body["max_reads"] - 1
        elif self.gone_detail is not None and body["secret_id"] in self.gone:
            status, answer = 404, {"detail": self.gone_detail}
        elif self.path.startswith("/vault/secret/delete"):
            self.gone.add(body["secret_id"])
            answer = {"secret_id": body["secret_id"], "deleted": True}
        else:
            answer = self.stored[body["secret_id"]]
            if "reads_left" in answer:
                self.gone.add(body["secret_id"])
        self.answer(status, answer)


def serve_undead(gone_detail: str | None) -> Iterator[str]:
    handler = type(
        "Handler", (UndeadVault,), {"stored": {}, "gone": set(), "gone_detail": gone_detail}
    )
    with stand_in_server(handler) as url:
        yield url


@pytest.fixture
def undead_server() -> Iterator[str]:
    yield from serve_undead(None)


@pytest.fixture
def oracle_server() -> Iterator[str]:
    yield from serve_undead("this secret was already read")


def test_a_secret_served_after_its_last_read_or_its_delete_fails_the_run(
    undead_server: str, tmp_path: Path
) -> None:
    run = run_locust(tmp_path, undead_server, "OneTimeUser", "ReadHeavyUser", users=4, seconds=4)

    assert run.returncode == 1, run.output
    assert {row["Name"] for row in run.failures} == {"fetch (used up)", "fetch (deleted)"}
    errors = {row["Name"]: row["Error"] for row in run.failures}
    assert "fetch (used up): expected HTTP 404, got 200" in errors["fetch (used up)"]
    assert "fetch (deleted): expected HTTP 404, got 200" in errors["fetch (deleted)"]
    assert run.failed("fetch (used up)") == run.requests("fetch (used up)") > 0
    assert run.failed("fetch (deleted)") == run.requests("fetch (deleted)") > 0
    # Everything else the stand-in answers as the contract says.
    assert run.failed("Aggregated") == run.failed("fetch (used up)") + run.failed("fetch (deleted)")


def test_a_404_that_tells_a_used_up_secret_from_an_unknown_one_fails_the_run(
    oracle_server: str, tmp_path: Path
) -> None:
    run = run_locust(tmp_path, oracle_server, "OneTimeUser", users=2, seconds=3)

    assert run.returncode == 1, run.output
    assert [(row["Name"], row["Error"]) for row in run.failures] == [
        (
            "fetch (used up)",
            'CatchResponseError("fetch (used up): 404 with another detail than an unknown id\'s")',
        )
    ]
    assert run.failed("fetch (used up)") == run.requests("fetch (used up)") > 0
