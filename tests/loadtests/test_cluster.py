"""The cluster harness: replicas behind a real HAProxy, one SIGKILLed under load, no loss;
and read limits exact across replicas under concurrent fetches.

The CI gate of the failover: ``python -m loadtests.cluster`` with 2 replicas for a few
seconds including one replica kill must find every acknowledged secret intact. Requests
that fail while the balancer takes the dead replica out are reported, not gated. The CI
gate of read limits: ``--read-limit-check`` on 2 replicas must serve each secret exactly
min(fetches, max_reads) times.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pymongo
import pytest

from loadtests.cluster import cluster, parser
from loadtests.haproxy import Balancer
from loadtests.report import read_acks
from tests.conftest import ROOT, clean_env, wait_until

pytestmark = pytest.mark.slow


def run_cluster(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -m loadtests.cluster ARGS``; on a hang it gets SIGTERM so it tears down."""
    if os.environ.get("TEST_MONGO_URI"):
        args = ("--mongo-uri", os.environ["TEST_MONGO_URI"], *args)
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtests.cluster", *args],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"the cluster harness ran over {timeout}s:\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_killing_a_replica_under_load_loses_no_acknowledged_secret(
    tmp_path: Path, haproxy: str
) -> None:
    run_dir = tmp_path / "run"
    result = run_cluster(
        "--replicas", "2",
        "--duration", "8",
        "--kill-replica-after", "3",
        "--users", "5",
        "--json",
        "--run-dir", str(run_dir),
        "--haproxy", haproxy,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)

    assert summary["ok"] is True, summary["problems"]
    assert summary["acknowledged"] > 0
    assert summary["lost"] == 0
    assert summary["unverified"] == 0
    assert summary["verified"] == summary["acknowledged"]
    assert summary["acknowledged"] == len(read_acks(run_dir / "acked.txt")[0])

    # The replica really died of the SIGKILL, the balancer took it out, the other one served.
    kill = summary["kill"]
    assert kill["replica"] == "r1"
    assert kill["signal"] == "SIGKILL"
    assert kill["returncode"] == -signal.SIGKILL
    assert 3 <= kill["at_seconds"] < 8
    assert kill["marked_down_after_seconds"] is not None
    assert summary["replica_exits"] == {"r1": -signal.SIGKILL, "r2": None}
    # HAProxy's name for it is its server-template slot (replica1, replica2), not r1.
    edge_log = (run_dir / "haproxy.log").read_text()
    downs = re.findall(r"Server secret-manager/(replica\d+) is DOWN", edge_log)
    assert len(set(downs)) == 1, downs
    # The load went through the edge's TLS frontend ("https~" in its request log).
    api_requests = [line for line in edge_log.splitlines() if '"POST /vault/secret/' in line]
    assert api_requests
    assert all(" https~ " in line for line in api_requests)
    assert summary["requests_after_kill"] > 0

    # Reported, not gated: the price of the failover in failed requests.
    print(
        f"failover: {summary['failures_after_kill']} of {summary['requests_after_kill']} "
        f"requests failed after the kill ({summary['failures']} of {summary['requests']} "
        f"in all); r1 marked down after {kill['marked_down_after_seconds']}s; "
        f"{summary['acknowledged']} acknowledged, {summary['lost']} lost"
    )


def test_a_p95_over_the_limit_fails_the_run_and_locust_status_is_shown(
    tmp_path: Path, haproxy: str
) -> None:
    result = run_cluster(
        "--replicas", "1",
        "--duration", "3",
        "--users", "2",
        "--max-p95-ms", "0.001",
        "--run-dir", str(tmp_path / "run"),
        "--haproxy", haproxy,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "FAIL: p95 " in result.stdout and "(at most 0.001)" in result.stdout
    assert "lost: 0" in result.stdout  # latency alone failed it
    assert "locust exit status: 0" in result.stdout


def test_a_haproxy_that_is_not_there_is_a_set_up_error(tmp_path: Path) -> None:
    result = run_cluster(
        "--replicas", "1", "--duration", "2", "--haproxy", str(tmp_path / "nowhere"),
    )  # fmt: skip
    assert result.returncode == 2  # set-up, not "a secret was lost"
    assert "is not an executable file" in result.stderr
    assert "Traceback" not in result.stderr


def test_read_limits_hold_across_two_replicas_under_concurrent_fetches(
    tmp_path: Path, haproxy: str
) -> None:
    result = run_cluster(
        "--read-limit-check",
        "--replicas", "2",
        "--secrets", "9",
        "--fetches", "12",
        "--max-reads", "1", "2", "5",
        "--secrets-at-once", "3",
        "--json",
        "--run-dir", str(tmp_path / "run"),
        "--haproxy", haproxy,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)

    assert summary["ok"] is True, summary["problems"]
    assert [r["max_reads"] for r in summary["results"]] == [1, 2, 5] * 3
    for r in summary["results"]:
        k = r["max_reads"]
        assert r["served"] == k, r  # 12 fetches of each, more than any limit
        assert r["gone"] == 12 - k, r
        assert r["errors"] == r["wrong"] == 0, r
        assert r["reads_left"] == list(range(k)), r  # each read answered its own count
        # More fetches of the secret were on the wire together than it had reads.
        assert r["peak_in_flight"] > k, r
    assert summary["reads_served"] == summary["reads_allowed"] == 3 * (1 + 2 + 5)
    # Both replicas answered, so reads of one secret raced across them.
    assert set(summary["by_replica"]) == {"r1", "r2"}
    assert min(summary["by_replica"].values()) > 0
    assert summary["stored_after"] == summary["expected_stored_after"] == 0
    assert "OK: no secret was served more" in result.stderr
    # Secret ids are bearer capabilities: none is printed.
    uuid_pattern = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    assert re.search(uuid_pattern, result.stdout + result.stderr) is None

    print(
        f"read limits: served {summary['reads_served']} of {summary['reads_allowed']} allowed, "
        f"{summary['not_found']} x 404, answers by replica {summary['by_replica']}, "
        f"reads served by replica {summary['served_by_replica']}, "
        f"at least {summary['min_peak_in_flight']} of 12 in flight at once"
    )


def test_the_read_limit_check_refuses_a_replica_kill() -> None:
    result = run_cluster("--read-limit-check", "--kill-replica-after", "1")
    assert result.returncode == 2
    assert "--read-limit-check runs no load to kill a replica in" in result.stderr


def test_through_the_edge_the_audit_log_and_the_rate_limit_see_the_client_not_the_edge(
    tmp_path: Path, haproxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients bound to 127.0.0.2 and 127.0.0.3 while HAProxy connects from 127.0.0.1, over
    TLS with HTTP/1.1 and HTTP/2: every audit record carries the client's address, and a
    client's own X-Forwarded-For neither changes it nor escapes the per-client rate limit."""
    for name in ("MASTER_KEY", "MONGO_URI", "MONGO_DB", "RATE_LIMIT", "RATE_LIMIT_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    limit = 30  # per client per hour, on counters shared by both replicas
    args = parser().parse_args(
        ["--replicas", "2", "--rate-limit", f"{limit}/hour", "--haproxy", haproxy]
    )
    args.mongo_uri = os.environ.get("TEST_MONGO_URI") or None
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def client(lb: Balancer, address: str, http2: bool, spoof: str | None) -> httpx.Client:
        transport = httpx.HTTPTransport(verify=lb.tls, local_address=address, http2=http2)
        headers = {"X-Forwarded-For": spoof} if spoof else {}
        return httpx.Client(base_url=lb.url, transport=transport, headers=headers, timeout=30)

    with cluster(args, run_dir) as (mongo_uri, mongo_db, _backends, lb):
        versions: set[str] = set()
        roundtrips = 0
        for http2, spoof in ((False, None), (True, None), (False, "203.0.113.9"), (True, "::1")):
            with client(lb, "127.0.0.2", http2, spoof) as c:
                for _ in range(2):
                    created = c.post("/vault/secret/create", json={"secret": "aGk="})
                    assert created.status_code == 200, created.text
                    secret_id = created.json()["secret_id"]
                    fetched = c.post("/vault/secret/fetch", json={"secret_id": secret_id})
                    assert fetched.status_code == 200, fetched.text
                    versions.add(fetched.http_version)
                    roundtrips += 1
        # The same client, now claiming a new address with every request: still limited.
        statuses: list[int] = []
        with client(lb, "127.0.0.2", True, None) as c:
            for number in range(3 * limit):
                answer = c.post(
                    "/vault/secret/fetch",
                    json={"secret_id": str(uuid.uuid4())},
                    headers={"X-Forwarded-For": f"198.51.100.{number % 250}"},
                )
                statuses.append(answer.status_code)
        with client(lb, "127.0.0.3", False, None) as c:
            other = c.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
        with pymongo.MongoClient(mongo_uri) as mongo:
            audit = mongo[mongo_db]["audit"]
            # One record per /vault request, 429s included.
            sent = 2 * roundtrips + 3 * limit + 1
            wait_until(lambda: audit.count_documents({}) >= sent, 30, "every audit record")
            addresses = sorted(audit.distinct("client_ip"))
            records = audit.count_documents({})

    assert versions == {"HTTP/1.1", "HTTP/2"}  # TLS through the edge, ALPN both ways
    # Never the edge's 127.0.0.1, never an address a client wrote.
    assert addresses == ["127.0.0.2", "127.0.0.3"]
    assert records == sent
    assert set(statuses) <= {404, 429}
    accepted = statuses.count(404) + 2 * roundtrips
    # Within one hour window at most `limit`; a window boundary in the middle doubles it.
    assert accepted <= 2 * limit
    assert statuses.count(429) >= limit
    assert other.status_code == 404  # another client has its own limit: not a shared ceiling
    print(
        f"edge: {records} audit records, addresses {addresses}; spoofing client: "
        f"{statuses.count(404)} answered, {statuses.count(429)} x 429 (limit {limit}/hour)"
    )
