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
from pathlib import Path
from typing import Any

import pytest

from loadtests.report import read_acks
from tests.conftest import ROOT, clean_env

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
    downs = re.findall(
        r"Server secret-manager/(replica\d+) is DOWN", (run_dir / "haproxy.log").read_text()
    )
    assert len(set(downs)) == 1, downs
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
