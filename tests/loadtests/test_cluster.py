"""The cluster harness: replicas behind a real HAProxy, one SIGKILLed under load, no loss.

The CI gate of the failover: ``python -m loadtests.cluster`` with 2 replicas for a few
seconds including one replica kill must find every acknowledged secret intact. Requests
that fail while the balancer takes the dead replica out are reported, not gated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from loadtests.cluster import counts_at, read_acks, verify
from tests.conftest import ROOT, ServerProcess, b64, clean_env

pytestmark = pytest.mark.slow


def haproxy() -> str:
    """HAProxy's path; only outside CI may its absence skip a test."""
    path = shutil.which("haproxy")
    if path is None and os.access("/usr/sbin/haproxy", os.X_OK):
        path = "/usr/sbin/haproxy"  # Debian's, when /usr/sbin is not on PATH
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed; .ci/run must install it")
        pytest.skip("haproxy is not installed on this machine")
    return path


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


def test_killing_a_replica_under_load_loses_no_acknowledged_secret(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cluster(
        "--replicas", "2",
        "--duration", "8",
        "--kill-replica-after", "3",
        "--users", "5",
        "--json",
        "--run-dir", str(run_dir),
        "--haproxy", haproxy(),
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
    assert "Server replicas/r1 is DOWN" in (run_dir / "haproxy.log").read_text()
    assert summary["requests_after_kill"] > 0

    # Reported, not gated: the price of the failover in failed requests.
    print(
        f"failover: {summary['failures_after_kill']} of {summary['requests_after_kill']} "
        f"requests failed after the kill ({summary['failures']} of {summary['requests']} "
        f"in all); r1 marked down after {kill['marked_down_after_seconds']}s; "
        f"{summary['acknowledged']} acknowledged, {summary['lost']} lost"
    )


def test_failures_in_the_second_of_the_kill_count_as_after_it(tmp_path: Path) -> None:
    # Locust's history as it was written in a real run: the row stamped with the kill's own
    # second was written after the kill and already holds the 4 creates it cut off.
    rows = [("1795885764", "Aggregated", 778, 0), ("1795885765", "Aggregated", 1048, 0),
            ("1795885765", "POST create", 524, 0), ("1795885766", "Aggregated", 1347, 4),
            ("1795885767", "Aggregated", 1628, 4)]  # fmt: skip
    (tmp_path / "locust_stats_history.csv").write_text(
        "Timestamp,Name,Total Request Count,Total Failure Count\n"
        + "".join(f"{t},{name},{n},{f}\n" for t, name, n, f in rows)
    )
    assert counts_at(tmp_path, 1795885766.05) == (1048, 0)  # so all 4 fall after the kill
    assert counts_at(tmp_path, 1795885767.0) == (1347, 4)
    assert counts_at(tmp_path, 1795885764.5) == (0, 0)  # nothing surely counted before it
    assert counts_at(tmp_path / "missing", 1795885766.0) is None


def test_the_loss_check_catches_a_missing_or_altered_secret(
    start_server: Callable[..., ServerProcess], mongo_uri: str, master_key: str, tmp_path: Path
) -> None:
    server = start_server(
        {"MASTER_KEY": master_key, "MONGO_URI": mongo_uri, "MONGO_DB": "t" + uuid.uuid4().hex}
    )
    stored = []
    for plaintext in (b"kept", b"altered"):
        response = httpx.post(
            server.url + "/vault/secret/create/", json={"secret": b64(plaintext)}, timeout=10
        )
        assert response.status_code == 200
        stored.append((response.json()["secret_id"], hashlib.sha256(plaintext).hexdigest()))
    (kept_id, kept_hash), (altered_id, _) = stored
    missing_id = str(uuid.uuid4())
    ack_file = tmp_path / "acked.txt"
    ack_file.write_text(
        f"{kept_id} {kept_hash}\n"
        f"{altered_id} {hashlib.sha256(b'something else').hexdigest()}\n"
        f"{missing_id} {kept_hash}\n"
        "a line cut short\n"
    )

    acks, malformed = read_acks(ack_file)
    assert malformed == 1
    lost, unverified = verify(server.url, acks)

    assert sorted(lost) == sorted([altered_id, missing_id])
    assert unverified == []

    # No answer at all is not "intact" either.
    server.stop()
    assert verify(server.url, acks[:1]) == ([], [kept_id])


def test_a_p95_over_the_limit_fails_the_run_and_locust_status_is_shown(tmp_path: Path) -> None:
    result = run_cluster(
        "--replicas", "1",
        "--duration", "3",
        "--users", "2",
        "--max-p95-ms", "0.001",
        "--run-dir", str(tmp_path / "run"),
        "--haproxy", haproxy(),
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
