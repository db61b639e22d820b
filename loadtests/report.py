"""What a run proved: Locust's statistics, the acknowledged secrets fetched back, the verdict.

Reads what the run left in its directory (Locust's CSV and JSON files, the ack file), fetches
every acknowledged secret through the balancer, and turns it all into a ``Summary``: its
problems decide the exit status, ``report`` prints it for a person.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import csv
import hashlib
import json
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx

from loadtests.load import Kill
from loadtests.processes import ClusterError


@dataclass
class FailureKind:
    """One row of Locust's failures: a request and an error, and how often it happened."""

    method: str
    name: str
    error: str
    occurrences: int


@dataclass
class Summary:
    """What a run proved; ``problems`` lists why it failed, if it did."""

    replicas: int
    users: int
    duration_seconds: int
    scenario: list[str]
    run_dir: str
    balancer_config: str
    kill: Kill | None
    acknowledged: int
    verified: int
    lost: int
    unverified: int
    malformed_ack_lines: int
    requests: int
    failures: int
    # After the kill, give or take Locust's one-second resolution: the failover's share.
    requests_after_kill: int | None
    failures_after_kill: int | None
    failures_by_kind: list[FailureKind]
    p95_ms: float | None  # of all requests, from Locust's statistics
    stored: int | None
    locust_exit_code: int
    replica_exits: dict[str, int | None]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_acks(path: Path) -> tuple[list[tuple[str, str]], int]:
    """The acknowledged ``(secret_id, sha256 hex)`` pairs, and how many lines were unreadable."""
    if not path.exists():
        return [], 0
    acks: list[tuple[str, str]] = []
    malformed = 0
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 2 and len(parts[1]) == 64:
            acks.append((parts[0], parts[1].lower()))
        else:
            malformed += 1
    return acks, malformed


def verify(
    url: str, acks: list[tuple[str, str]], tls: ssl.SSLContext | bool = True
) -> tuple[list[str], list[str]]:
    """Fetch every acknowledged secret through the balancer: the (lost, unverified) ids.

    Lost: the service answered and the secret is missing or its bytes differ. Unverified: no
    definite answer after three tries (a transport error or a 5xx).
    """

    def check(client: httpx.Client, secret_id: str, digest: str) -> str:
        for attempt in range(3):
            if attempt:
                time.sleep(0.5)
            try:
                response = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
            except httpx.HTTPError:
                continue
            if response.status_code >= 500:
                continue
            if response.status_code != 200:
                return "lost"
            try:
                plaintext = base64.b64decode(response.json()["secret"], validate=True)
            except (ValueError, KeyError, TypeError):
                return "lost"  # an answer, but not the secret
            return "ok" if hashlib.sha256(plaintext).hexdigest() == digest else "lost"
        return "unverified"

    lost: list[str] = []
    unverified: list[str] = []
    with (
        httpx.Client(base_url=url, timeout=10, verify=tls) as client,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        futures = {pool.submit(check, client, sid, digest): sid for sid, digest in acks}
        for future in concurrent.futures.as_completed(futures):
            outcome = future.result()
            if outcome == "lost":
                lost.append(futures[future])
            elif outcome == "unverified":
                unverified.append(futures[future])
    return lost, unverified


def _p95(entries: list[dict[str, Any]]) -> float | None:
    """The p95 of every request of Locust's final JSON (its response_times histograms)."""
    counts: Counter[float] = Counter()
    for entry in entries:
        for milliseconds, count in entry.get("response_times", {}).items():
            counts[float(milliseconds)] += int(count)
    total = sum(counts.values())
    seen = 0
    for milliseconds in sorted(counts):
        seen += counts[milliseconds]
        if seen >= 0.95 * total:
            return milliseconds
    return None


def read_locust_stats(run_dir: Path) -> tuple[int, int, list[FailureKind], float | None]:
    """Requests and failures of the whole run, the failures by kind, and the p95 in ms.

    Locust rewrites its CSV files once a second and not at exit, so they miss the last
    second; the totals come from the JSON it writes at exit (``--json-file``), and failures
    the CSV has not broken down yet are listed as such.
    """
    final = run_dir / "locust.json"
    if final.exists():
        entries = json.loads(final.read_text())
        requests = sum(int(entry["num_requests"]) for entry in entries)
        failures = sum(int(entry["num_failures"]) for entry in entries)
        p95 = _p95(entries)
    else:
        stats_path = run_dir / "locust_stats.csv"
        if not stats_path.exists():
            lines = (run_dir / "locust.log").read_text(errors="replace").splitlines()
            tail = "\n".join(lines[-10:])
            raise ClusterError(f"locust wrote no statistics; locust.log ends with:\n{tail}")
        with stats_path.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["Name"] == "Aggregated"]
        requests = int(rows[0]["Request Count"]) if rows else 0
        failures = int(rows[0]["Failure Count"]) if rows else 0
        p95 = float(rows[0]["95%"]) if rows and rows[0].get("95%") not in (None, "N/A") else None
    kinds: list[FailureKind] = []
    failures_path = run_dir / "locust_failures.csv"
    if failures_path.exists():
        with failures_path.open(newline="") as handle:
            kinds = [
                FailureKind(row["Method"], row["Name"], row["Error"], int(row["Occurrences"]))
                for row in csv.DictReader(handle)
            ]
    unlisted = failures - sum(kind.occurrences for kind in kinds)
    if unlisted > 0:
        kinds.append(FailureKind("", "", "in Locust's last second (not in its CSV)", unlisted))
    return requests, failures, kinds, p95


def counts_at(run_dir: Path, wall_time: float) -> tuple[int, int] | None:
    """Requests and failures Locust had surely counted before ``wall_time``, from its
    per-second history.

    A history row is stamped with the whole second it was written in, at any moment of that
    second: the row of the kill's own second may already hold the requests the kill cut
    off. Only rows of earlier seconds are counted, so every failure the kill caused falls
    after it (and up to a second of requests before it does too).
    """
    path = run_dir / "locust_stats_history.csv"
    if not path.exists():
        return None
    counts = (0, 0)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated" and int(row["Timestamp"]) < int(wall_time):
                counts = (int(row["Total Request Count"]), int(row["Total Failure Count"]))
    return counts


def judge(summary: Summary, args: argparse.Namespace) -> None:
    """Add to ``summary.problems`` every way the run failed the limits of the command line."""
    problems = summary.problems
    if summary.lost:
        problems.append(
            f"{summary.lost} acknowledged secrets lost (ids in {summary.run_dir}/lost.txt)"
        )
    if summary.unverified:
        problems.append(f"{summary.unverified} acknowledged secrets could not be fetched")
    if summary.malformed_ack_lines:
        problems.append(f"{summary.malformed_ack_lines} unreadable lines in the ack file")
    if args.max_failures is not None and summary.failures > args.max_failures:
        problems.append(f"{summary.failures} failed requests (at most {args.max_failures})")
    if args.max_p95_ms is not None:
        if summary.p95_ms is None:
            problems.append("no p95 in Locust's statistics to hold to --max-p95-ms")
        elif summary.p95_ms > args.max_p95_ms:
            problems.append(f"p95 {summary.p95_ms:g} ms (at most {args.max_p95_ms:g})")
    if args.kill_replica_after is not None and summary.kill is None:
        problems.append("the replica kill did not happen before the load ended")
    killed = summary.kill.replica if summary.kill else None
    for name, code in summary.replica_exits.items():
        if name != killed and code is not None:
            problems.append(f"replica {name} exited on its own with status {code}")
    if summary.requests == 0:
        problems.append("locust sent no requests")


def report(summary: Summary) -> str:
    """The summary as lines for a person, ending with OK or FAILED."""
    scenario = " ".join(summary.scenario)
    lines = [
        f"{summary.replicas} replicas behind HAProxy, {summary.users} users for "
        f"{summary.duration_seconds}s ({scenario})",
    ]
    if summary.kill is not None:
        kill = summary.kill
        down = (
            f"HAProxy marked it down {kill.marked_down_after_seconds}s later"
            if kill.marked_down_after_seconds is not None
            else "HAProxy never marked it down"
        )
        lines.append(
            f"killed {kill.replica} (pid {kill.pid}) {kill.at_seconds}s into the load: "
            f"exit {kill.returncode} ({kill.signal}); {down}"
        )
    p95 = "-" if summary.p95_ms is None else f"{summary.p95_ms:g} ms"
    lines.append(f"requests: {summary.requests}, failed: {summary.failures}, p95: {p95}")
    if summary.requests_after_kill is not None:
        lines.append(
            f"after the kill: {summary.requests_after_kill} requests,"
            f" {summary.failures_after_kill} failed"
        )
    lines.extend(
        f"  {kind.occurrences} x {kind.method} {kind.name}: {kind.error}"
        for kind in summary.failures_by_kind
    )
    lines.append(
        f"acknowledged secrets: {summary.acknowledged}, fetched intact: {summary.verified}, "
        f"lost: {summary.lost}, unverified: {summary.unverified}"
    )
    if summary.stored is not None:
        lines.append(
            f"secrets stored: {summary.stored} "
            f"({summary.stored - summary.acknowledged} never acknowledged)"
        )
    lines.append(
        f"locust exit status: {summary.locust_exit_code} (reported, not obeyed; "
        "see --max-failures and --max-p95-ms)"
    )
    lines.append(f"run directory: {summary.run_dir}")
    lines.extend(f"FAIL: {problem}" for problem in summary.problems)
    lines.append("OK: nothing acknowledged was lost" if summary.ok else "FAILED")
    return "\n".join(lines)
