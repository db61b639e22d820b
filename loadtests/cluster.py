"""The Swarm topology on one machine, under load, with a replica killed mid-run.

Starts a MongoDB (``--mongo-uri`` or ``MONGO_URI``, else an nx-27017 server of its own), N
replicas of ``secret-manager serve`` sharing one master key and database, and HAProxy in
front of them health-checking ``/readyz``. It runs a Locust scenario headless through the
balancer, SIGKILLs one replica when asked to, then fetches every secret the run acknowledged
and reports how many were lost (must be 0) and how many requests failed after the kill::

    python -m loadtests.cluster --replicas 3 --duration 30 --kill-replica-after 10
    python -m loadtests.cluster --replicas 2 --duration 8 --kill-replica-after 3 --users 5 --json
    python -m loadtests.cluster --scenario RoundtripUser --users 20 --spawn-rate 5 --duration 60
    python -m loadtests.cluster --mongo-uri 'mongodb://db1,db2,db3/?replicaSet=rs0'
    python -m loadtests.cluster --max-p95-ms 250 --max-failures 0

The killed replica is ``r1``, S seconds after the first request reaches the balancer.
Locust's own exit status (non-zero on any failed request) is reported, not obeyed: requests
cut off by the kill are expected to fail; ``--max-failures`` sets a limit on them, and
``--max-p95-ms`` one on the p95 of all requests (a ``--max-p95-ms`` passed to Locust
through ``--locust-args`` only shows in Locust's exit status). Replicas
run with ``RATE_LIMIT=off`` and ``LOG_LEVEL=WARNING``; other settings in the environment
(``AUDIT_MODE``, ``MONGO_WRITE_CONCERN``, ...) pass through to them.

It needs HAProxy (Debian: ``apt-get install haproxy``) and the ``loadtest`` extra
(``pip install -e '.[loadtest]'``). Everything listens on 127.0.0.1. The run directory
(``--run-dir``, else a new temporary one; printed at the end) keeps every process's log, the
HAProxy configuration, Locust's CSV files and the acknowledged ids. HAProxy's live statistics
page is at the ``stats`` URL printed at start-up.

Exit status: 0 when every acknowledged secret came back intact (and failures stayed within
``--max-failures``), 1 when not, 2 when the cluster could not be set up or run, 130 on Ctrl-C.
Every process it started is stopped on the way out, whatever happened.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx2 as httpx
import pymongo
import pymongo.errors

from vault.crypto import generate_key

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
BACKEND = "replicas"
# Locust needs a moment to import and spawn; past its run time this much more is a hang.
LOCUST_GRACE_SECONDS = 60.0


class ClusterError(Exception):
    """The cluster could not be set up or run: a configuration or environment problem."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; ClusterError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise ClusterError(f"timed out after {timeout:g}s waiting for {what}")


def log(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)


class Process:
    """A child process with its output in a log file, stopped within bounded waits."""

    def __init__(
        self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        try:
            # Its own session: a Ctrl-C reaches only this harness, which stops the children
            # in order (load first, then balancer, replicas, database).
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(  # noqa: S603 (our commands)
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise ClusterError(f"cannot start {name} ({command[0]}): {exc}") from None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise ClusterError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"{self.log_path} ends with:\n{self.tail()}"
            )

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def reap(self, timeout: float) -> int:
        """Wait for the exit (SIGKILL after ``timeout``); the exit status."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop within {timeout:g}s; killing it")
            self.popen.kill()
            self.popen.wait(10)
        finally:
            self._log.close()
        return self.popen.returncode

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int:
        self.send(sig)
        return self.reap(timeout)


def executable(name: str, *fallbacks: str) -> str:
    """The full path of a program this harness runs, or a ClusterError saying what to install."""
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if os.access(path, os.X_OK):
            return path
    hint = {
        "haproxy": "apt-get install haproxy",
        "wrk": "apt-get install wrk",
        "nx-27017": "pip install nx-27017",
    }[name]
    raise ClusterError(f"{name} is not installed ({hint})")


def mongo_answers(uri: str) -> bool:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
    )
    try:
        client.admin.command("ping")
        return True
    except pymongo.errors.PyMongoError:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def mongodb(uri: str | None, run_dir: Path) -> Iterator[str]:
    """The given MongoDB once it answers, else an nx-27017 server of this run."""
    if uri:
        wait_for(lambda: mongo_answers(uri), 15, "the MongoDB of --mongo-uri to answer ping")
        yield uri
        return
    directory = run_dir / "nx"
    directory.mkdir()
    port = free_port()
    server = Process(
        "nx-27017",
        [
            # The one beside this Python first: a venv's scripts need not be on PATH.
            executable("nx-27017", str(Path(sys.executable).with_name("nx-27017"))),
            "--data-dir", str(directory / "data"),
            "-p", str(port),
            "--log-file", str(directory / "nx.log"),
            "--pid-file", str(directory / "nx.pid"),
        ],
        run_dir / "nx-27017.out",
    )  # fmt: skip
    try:
        own_uri = f"mongodb://127.0.0.1:{port}/"

        def answers() -> bool:
            server.check_alive()
            return mongo_answers(own_uri)

        wait_for(answers, 20, "nx-27017 to answer ping")
        log(f"nx-27017 on {own_uri} (pid {server.pid})")
        yield own_uri
    finally:
        server.stop(10)


def answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Replica:
    name: str
    port: int
    process: Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def replica_env(mongo_uri: str, mongo_db: str, master_key: str, data_dir: Path) -> dict[str, str]:
    """This process's environment with the settings the harness owns replaced.

    Other settings (``AUDIT_MODE``, ``MONGO_WRITE_CONCERN``, ...) pass through, so a run can
    try them; ``*_FILE`` variants of the replaced ones are dropped, as both forms conflict.
    """
    owned = ("MASTER_KEY", "MONGO_URI", "AUDIT_HMAC_KEY")
    exact = {"MONGO_DB", "RATE_LIMIT", "LOG_LEVEL", "DATA_DIR"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(owned) and k not in exact}
    env.update(
        MASTER_KEY=master_key,
        MONGO_URI=mongo_uri,
        MONGO_DB=mongo_db,
        # All the load comes from one address; a per-IP limit would refuse most of it.
        RATE_LIMIT="off",
        LOG_LEVEL="WARNING",
        DATA_DIR=str(data_dir),
    )
    return env


@contextlib.contextmanager
def replicas(count: int, mongo_uri: str, mongo_db: str, run_dir: Path) -> Iterator[list[Replica]]:
    """``count`` real ``secret-manager serve`` processes on one key and one database."""
    master_key = generate_key()
    started: list[Replica] = []
    try:
        for index in range(1, count + 1):
            name = f"r{index}"
            port = free_port()
            env = replica_env(mongo_uri, mongo_db, master_key, run_dir / f"{name}-data")
            command = [sys.executable, "-m", "vault", "serve", "--port", str(port)]
            process = Process(name, command, run_dir / f"{name}.log", env)
            started.append(Replica(name, port, process))
        for replica in started:

            def ready(replica: Replica = replica) -> bool:
                replica.process.check_alive()
                return answers_200(replica.url + "/readyz")

            wait_for(ready, 30, f"replica {replica.name} on {replica.url} to be ready")
        log(
            f"{count} replicas on database {mongo_db}: "
            + ", ".join(f"{r.name} {r.url} (pid {r.process.pid})" for r in started)
        )
        yield started
    finally:
        # Stop them together: each may take its graceful timeout.
        for replica in started:
            replica.process.send(signal.SIGTERM)
        for replica in started:
            replica.process.reap(15)


def haproxy_config(port: int, stats_port: int, backends: list[Replica]) -> str:
    """One frontend, one round-robin backend health-checked on /readyz, a statistics page."""
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port}" for r in backends)
    return f"""\
# Generated by loadtests/cluster.py for one run.
global
    maxconn 4096

defaults
    mode http
    # Loopback: a connect that takes over a second is a dead replica, not a slow network.
    timeout connect 1s
    timeout client 30s
    # The service answers within STORE_TIMEOUT_SECONDS (4 s) plus 1 s, or says 503.
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 5s
    # /readyz may take its 2 s store budget under load; that is slow, not down.
    timeout check 3s

frontend vault
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    # Two failed checks half a second apart take a dead replica out; two good ones bring it back.
    default-server check inter 500ms fall 2 rise 2
    # Until then, a connection a dead replica refuses is retried on another one (every retry
    # goes to another server), so new requests never notice the dead one.
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response
    # A request that reached a replica which then closed without answering is replayed only
    # when replaying cannot store anything twice: reads, and fetch (a POST that only reads).
    # A create may have been stored before the replica died; its client gets 502 and decides.
    # Connection failures (the request never left) are still retried for every method.
    acl replay_safe method GET HEAD
    acl replay_safe path /vault/secret/fetch /vault/secret/fetch/
    http-request disable-l7-retry unless replay_safe
{servers}

frontend stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
    stats refresh 1s
"""


class Balancer:
    """HAProxy in the foreground, with its statistics read over HTTP."""

    def __init__(self, haproxy: str, backends: list[Replica], run_dir: Path) -> None:
        self.port = free_port()
        self.stats_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats_url = f"http://127.0.0.1:{self.stats_port}/stats"
        self.config_path = run_dir / "haproxy.cfg"
        self.config_path.write_text(haproxy_config(self.port, self.stats_port, backends))
        check = subprocess.run(  # noqa: S603 (our command)
            [haproxy, "-c", "-q", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            raise ClusterError(f"haproxy refuses {self.config_path}: {check.stderr.strip()}")
        self.process = Process(
            "haproxy", [haproxy, "-f", str(self.config_path), "-db"], run_dir / "haproxy.log"
        )
        self._client = httpx.Client(timeout=2)

    def wait_ready(self, names: list[str]) -> None:
        def ready() -> bool:
            self.process.check_alive()
            try:
                states = self.server_states()
            except ClusterError:
                return False  # not listening yet
            up = all(states.get(name, "").startswith("UP") for name in names)
            return up and answers_200(self.url + "/healthz")

        wait_for(ready, 20, "HAProxy to see every replica up and answer /healthz")

    def stats(self) -> list[dict[str, str]]:
        """HAProxy's statistics, one row per frontend, backend and server."""
        try:
            response = self._client.get(self.stats_url + ";csv")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise ClusterError(f"HAProxy's statistics page does not answer: {exc}") from None
        return list(csv.DictReader(response.text.removeprefix("# ").splitlines()))

    def server_states(self) -> dict[str, str]:
        """Each backend server's status: ``UP``, ``DOWN``, ``UP 1/2`` (going down), ..."""
        return {
            row["svname"]: row["status"]
            for row in self.stats()
            if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def frontend_requests(self) -> int:
        for row in self.stats():
            if row["pxname"] == "vault" and row["svname"] == "FRONTEND":
                return int(row["req_tot"] or 0)
        return 0

    def close(self) -> None:
        self._client.close()
        self.process.stop(10)


@contextlib.contextmanager
def balancer(haproxy: str, backends: list[Replica], run_dir: Path) -> Iterator[Balancer]:
    lb = Balancer(haproxy, backends, run_dir)
    try:
        lb.wait_ready([r.name for r in backends])
        log(f"HAProxy on {lb.url} (pid {lb.process.pid}); stats {lb.stats_url}")
        yield lb
    finally:
        lb.close()


@dataclass
class Kill:
    """The replica killed mid-run, and what became of it."""

    replica: str
    pid: int
    at_seconds: float
    returncode: int | None
    signal: str | None
    unix_time: float
    marked_down_after_seconds: float | None = None


@dataclass
class FailureKind:
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


def locust_command(args: argparse.Namespace, host: str, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust",
        "-f", str(args.locustfile),
        "--headless",
        "-u", str(args.users),
        "-r", str(args.spawn_rate or args.users),
        "-t", f"{args.duration}s",
        "--host", host,
        "--csv", str(run_dir / "locust"),
        "--json-file", str(run_dir / "locust"),
        *shlex.split(args.locust_args),
        *args.scenario,
    ]  # fmt: skip


def run_load(
    args: argparse.Namespace, lb: Balancer, backends: list[Replica], run_dir: Path
) -> tuple[int, Kill | None]:
    """Run Locust through the balancer, killing a replica on the way if asked; its status."""
    env = {**os.environ, "LOADTEST_ACK_FILE": str(run_dir / "acked.txt")}
    baseline = lb.frontend_requests()
    locust = Process("locust", locust_command(args, lb.url, run_dir), run_dir / "locust.log", env)
    started = time.monotonic()
    log(f"locust: {args.users} users for {args.duration}s ({' '.join(args.scenario)})")
    victim = backends[0] if args.kill_replica_after is not None else None
    load_started: float | None = None
    kill: Kill | None = None
    killed_at = 0.0
    try:
        while locust.alive():
            now = time.monotonic()
            if now - started > args.duration + LOCUST_GRACE_SECONDS:
                raise ClusterError(f"locust still running {LOCUST_GRACE_SECONDS:g}s past -t")
            if load_started is None and (
                lb.frontend_requests() > baseline or now - started > LOCUST_GRACE_SECONDS / 2
            ):
                # The kill clock starts with the first request, not with Locust's imports.
                load_started = now
            if (
                victim is not None
                and kill is None
                and load_started is not None
                and now - load_started >= args.kill_replica_after
            ):
                victim.process.send(signal.SIGKILL)
                killed_at, killed_unix_time = time.monotonic(), time.time()
                code = victim.process.reap(5)
                kill = Kill(
                    replica=victim.name,
                    pid=victim.process.pid,
                    at_seconds=round(killed_at - load_started, 2),
                    returncode=code,
                    signal=signal.Signals(-code).name if code < 0 else None,
                    unix_time=round(killed_unix_time, 3),
                )
                log(f"killed {victim.name} (pid {kill.pid}) at {kill.at_seconds}s: {kill.signal}")
            if (
                kill is not None
                and kill.marked_down_after_seconds is None
                and lb.server_states().get(kill.replica, "").startswith("DOWN")
            ):
                kill.marked_down_after_seconds = round(time.monotonic() - killed_at, 2)
            time.sleep(0.1)
    finally:
        if locust.alive():
            # On SIGTERM Locust stops its users and still writes its statistics.
            locust.stop(15)
        else:
            locust.reap(1)
    if kill is not None and kill.marked_down_after_seconds is None:
        with contextlib.suppress(ClusterError):
            wait_for(
                lambda: lb.server_states().get(kill.replica, "").startswith("DOWN"),
                5,
                f"HAProxy to mark {kill.replica} down",
            )
            kill.marked_down_after_seconds = round(time.monotonic() - killed_at, 2)
    return locust.popen.returncode, kill


def count_secrets(mongo_uri: str, mongo_db: str) -> int | None:
    """Secrets the run stored, acknowledged or not (a create cut off by the kill may be)."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000, timeoutMS=30000
    )
    try:
        return int(client[mongo_db]["secrets"].count_documents({}))
    except pymongo.errors.PyMongoError:
        return None
    finally:
        client.close()


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


def verify(url: str, acks: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
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
        httpx.Client(base_url=url, timeout=10) as client,
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


def run(args: argparse.Namespace, run_dir: Path) -> Summary:
    """Set up the cluster, load it, kill a replica if asked, tear down, verify, summarise."""
    haproxy = args.haproxy or executable("haproxy", "/usr/sbin/haproxy")
    if not (os.path.isfile(haproxy) and os.access(haproxy, os.X_OK)):
        raise ClusterError(f"--haproxy {haproxy} is not an executable file")
    if not Path(args.locustfile).exists():
        raise ClusterError(f"no locustfile at {args.locustfile}")
    with contextlib.ExitStack() as stack:
        mongo_uri = stack.enter_context(mongodb(args.mongo_uri, run_dir))
        mongo_db = "cluster_" + uuid.uuid4().hex[:12]
        backends = stack.enter_context(replicas(args.replicas, mongo_uri, mongo_db, run_dir))
        lb = stack.enter_context(balancer(haproxy, backends, run_dir))
        locust_code, kill = run_load(args, lb, backends, run_dir)
        requests, failures, kinds, p95 = read_locust_stats(run_dir)
        acks, malformed = read_acks(run_dir / "acked.txt")
        log(f"verifying {len(acks)} acknowledged secrets through the balancer")
        lost, unverified = verify(lb.url, acks)
        exits = {r.name: r.process.popen.poll() for r in backends}
        stored = count_secrets(mongo_uri, mongo_db)
    at_kill = counts_at(run_dir, kill.unix_time) if kill is not None else None
    summary = Summary(
        replicas=args.replicas,
        users=args.users,
        duration_seconds=args.duration,
        scenario=list(args.scenario),
        run_dir=str(run_dir),
        balancer_config=str(run_dir / "haproxy.cfg"),
        kill=kill,
        acknowledged=len(acks),
        verified=len(acks) - len(lost) - len(unverified),
        lost=len(lost),
        unverified=len(unverified),
        malformed_ack_lines=malformed,
        requests=requests,
        failures=failures,
        requests_after_kill=None if at_kill is None else requests - at_kill[0],
        failures_after_kill=None if at_kill is None else failures - at_kill[1],
        failures_by_kind=kinds,
        p95_ms=p95,
        stored=stored,
        locust_exit_code=locust_code,
        replica_exits=exits,
    )
    if lost:
        # Private, like the ack file: a secret id is a bearer capability.
        descriptor = os.open(run_dir / "lost.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w") as handle:
            handle.writelines(f"{sid}\n" for sid in lost)
    judge(summary, args)
    return summary


def judge(summary: Summary, args: argparse.Namespace) -> None:
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


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.cluster",
        description="Replicas of secret-manager behind HAProxy under Locust, with a replica "
        "killed mid-run; fails when an acknowledged secret is lost.",
    )
    p.add_argument("--replicas", type=positive_int, default=3, help="replicas to start (3)")
    p.add_argument("--users", type=positive_int, default=10, help="Locust users (10)")
    p.add_argument(
        "--spawn-rate", type=float, help="users started per second (all in the first second)"
    )
    p.add_argument("--duration", type=positive_int, default=30, help="seconds of load (30)")
    p.add_argument(
        "--scenario",
        nargs="+",
        default=["RoundtripUser"],
        metavar="USER_CLASS",
        help="Locust user classes to run (RoundtripUser)",
    )
    p.add_argument(
        "--kill-replica-after",
        type=float,
        metavar="S",
        help="SIGKILL replica r1 S seconds after the load starts",
    )
    p.add_argument(
        "--max-failures", type=int, metavar="N", help="also fail when over N requests failed"
    )
    p.add_argument(
        "--max-p95-ms",
        type=float,
        metavar="MS",
        help="also fail when the p95 of all requests is over MS milliseconds",
    )
    p.add_argument(
        "--mongo-uri",
        default=os.environ.get("MONGO_URI"),
        help="MongoDB to use (default: MONGO_URI, else an nx-27017 server of this run)",
    )
    p.add_argument("--run-dir", type=Path, help="where logs and results go (a new temp dir)")
    p.add_argument("--locustfile", type=Path, default=LOCUSTFILE, help="(loadtests/locustfile.py)")
    p.add_argument("--locust-args", default="", help="more Locust options, one shell-quoted string")
    p.add_argument("--haproxy", help="path of the haproxy binary (found on PATH)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so every child is stopped on the way out.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.kill_replica_after is not None:
        if args.replicas < 2:
            parser().error("--kill-replica-after needs at least 2 replicas")
        if not 0 <= args.kill_replica_after < args.duration:
            parser().error("--kill-replica-after must be at least 0 and less than --duration")
    if args.run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="secret-manager-cluster-"))
    else:
        run_dir = args.run_dir.resolve()
        if run_dir.exists() and any(run_dir.iterdir()):
            # An earlier run's ack file would be appended to and checked again.
            parser().error(f"--run-dir {run_dir} is not empty")
        run_dir.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = run(args, run_dir)
    except ClusterError as exc:
        log(f"error: {exc}")
        log(f"logs are in {run_dir}")
        return 2
    except KeyboardInterrupt:
        log(f"interrupted; everything is stopped; logs are in {run_dir}")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(report(summary), file=sys.stderr)
        print(json.dumps({**asdict(summary), "ok": summary.ok}, indent=2))
    else:
        print(report(summary))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
