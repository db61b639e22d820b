"""Benchmark: create and fetch through the full stack, beside its floor and its baseline.

In one run, each configuration is started as a real server process (one Hypercorn worker,
as in a container) on a store of its own (a MongoDB-wire server, or a SQLite data
directory), and loaded with ``wrk`` (Debian package) through ``loadtests/bench.lua``:

- ``echo``: a bare Starlette JSON echo endpoint on the same Hypercorn: the stack's floor;
- ``full stack``: the service with its defaults (audit in sync mode, rate limiting with
  in-process counters, metrics);
- ``+ shared counters``: rate-limit counters in MongoDB, as ``stack.yml`` deploys it;
- the full stack with each middleware switched off in turn, and with all of them off;
- ``+ tracing``: the full stack exporting every span over OTLP/HTTP to a local sink;
- ``+ webhooks``: the full stack delivering every lifecycle event (``WEBHOOK_URLS``, a
  ``whsec_`` secret made for the run) to a receiver the bench serves on 127.0.0.1
  (``loadtests/receivers.py``), which answers 200 at once and notes each delivery; after
  its cells each server has up to ``DRAIN_SECONDS`` to empty its outbox;
- ``+ webhooks, hanging receiver``: the same, to a receiver that accepts each connection
  and never answers (``WEBHOOK_TIMEOUT_SECONDS`` at its default, 10 s);
- ``naive``: two synchronous, unbatched inserts per request (secret, then audit record);
  ``naive, no TTL index``: the same without the service's TTL index on its secrets;
- ``full stack (sqlite)``: the service on its embedded SQLite store (``DATA_DIR``);
- ``naive (sqlite)``: the naive app on SQLite at the service's durability (one connection
  per thread, WAL, ``synchronous=FULL``, the secret and its audit record each committed).

``--store mongo|sqlite|both`` (both) runs the configurations of those stores only; the echo
runs always. Each SQLite cell gets a data directory made for it alone.

Each configuration first stores ``FETCH_SECRETS`` secrets (untimed) and takes fetches of
them, each request a different id in turn (so concurrent fetches never share a read), then
creates: every fetch cell reads a collection of one size, whatever its configuration's
creates achieve (nx-27017 scans a TTL-indexed collection on every find). The
service's configurations then take the lifecycle's own paths, each on secrets created for
it before its timed cell (untimed):

- ``fetch (max_reads 1000000)``: fetches of read-limited secrets that never run out (a pool
  of ``FETCH_POOL`` asked in turn): the atomic take of one read, without a last read;
- ``fetch (max_reads 1)``: one-time secrets, a fresh one per request: the take of the last
  read, which also deletes the record before answering (the dearest read-limited fetch);
- ``delete``: deletes of fresh secrets, one per request;
- ``create (receipt)``: creates asking for a receipt, with a label;
- ``create (idempotent)``: creates each with an ``Idempotency-Key`` header of its own
  (bench.lua's per-request headers; a key sent twice would be a replay, counted an error);
- ``create (passphrase)``, ``fetch (passphrase)``: creates with a passphrase, then fetches
  with it of the secrets those creates stored (at most ``PASSPHRASE_POOL``, asked in turn;
  made up, untimed, to one per connection when they stored fewer). Each such request costs
  a scrypt derivation (about 0.2 s of a core, at most two at once per process): a few
  requests a second, so their cells come last, let wrk wait past the cell's end for an
  answer, and count the server's CPU until it has worked off what wrk left queued (one
  request per connection), over the requests answered and those (``--no-passphrase``
  leaves them out).

The echo takes the same requests (it answers them back); the naive app only creates and
fetches, so only those rows compare with it. A table then divides each lifecycle row by
the plain create (for the create rows) or fetch (the others) of the same configuration and
concurrency: throughput, p50, server and database CPU per request. For each cell it
reports throughput, p50/p95/p99 latency and the server process's CPU time per request
(steadier than wall time on a shared machine), and prints a markdown table::

    python -m loadtests.bench                      # 5 s per cell, 20 connections, 3 rounds
    python -m loadtests.bench --duration 10 --concurrency 1,20,100 --mongo-uri mongodb://...
    python -m loadtests.bench --issue17            # exactly the table issue #17 asks for
    python -m loadtests.bench --issue27            # issue #27's: both stores, both naives

Without ``--mongo-uri`` each (round, configuration, concurrency) gets an nx-27017 server of
its own, started fresh (its own data directory and port) and stopped after that cell's
measurement; its process's CPU is the cell's DB CPU. nx-27017 purges every TTL-indexed
collection it holds, in any database, on each ``find`` (two scans each), which a real
mongod's TTL monitor never does on a read: on one shared server every configuration's reads
would pay for the collections the others left behind. With ``--mongo-uri`` every cell runs
on that server, on a fresh database. ``--concurrency`` takes a comma list; every
configuration is measured at every concurrency. Rounds interleave them: per round, each
concurrency in turn
(in an order rotated from round to round) has every configuration measured one after the
other (also rotated), so the cells compared with each other are measured minutes apart at
most. Each cell is the median of the rounds. A cell at one connection runs
``LOW_CONCURRENCY_FACTOR`` times ``--duration``: requests there come one at a time, and its
p50 is the number compared.

When the run has both a full stack and the naive app of its store, a table gives their
ratios per cell (full stack / naive: throughput, p50, p99, server CPU per request) beside
the targets of issues #17 and #27 (the same numbers), each marked met or not met: on
MongoDB against the naive app with the TTL index and against it without, on SQLite against
the SQLite naive app. "req/s vs naive" in the main table divides by the naive app of the
configuration's own store.

Every server imports the service from this checkout (PYTHONPATH set to it). To measure a
previous revision beside it, in the same interleaved run, give a checkout of that revision
(``git worktree add DIR COMMIT``)::

    python -m loadtests.bench --issue17 --compare-source DIR

which adds ``full stack @<DIR's short hash>``: the full stack served with PYTHONPATH=DIR,
and a table of ratios (this checkout's full stack / that one's) per op and concurrency;
when the run has ``full stack (sqlite)``, ``full stack (sqlite) @<hash>`` and its table too.

With the full stack and a webhooks configuration, tables of the same ratios compare them
(webhooks on / off, and receiver hanging / healthy). With ``+ webhooks``, one more table
gives per concurrency, every round together, the deliveries the healthy receiver answered
(by event type), how many repeated a ``webhook-id``, p50/p99/max of the time from each
event's ``timestamp`` (its change) to the receiver's 200, and the events the servers left
in their outboxes; with the hanging receiver, a line says how many connections it held::

    python -m loadtests.bench --concurrency 1,20 --no-lifecycle \
        --only "full stack" "full stack + webhooks" "full stack + webhooks, hanging receiver"
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import httpx2 as httpx
import pymongo

from loadtests.mongo import mongodb, nx_pid
from loadtests.processes import ClusterError, executable, free_port, positive_int
from loadtests.receivers import Deliveries, Receiver, percentile, receiver
from loadtests.revisions import check_source, revision
from vault.crypto import generate_key

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent  # the checkout this bench belongs to
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SECRET = base64.b64encode(b"benchmark secret: 32 bytes long!").decode()
SCRIPT = Path(__file__).with_name("bench.lua")
# Secrets stored (untimed) before each configuration's fetch cell, which reads them in
# turn: every fetch cell reads a collection of this size, whatever the throughput of its
# configuration's creates (nx-27017 scans a TTL-indexed collection on every find).
FETCH_SECRETS = 2000
SEED_CONNECTIONS = 20  # how many at once store them
FETCH_POOL = 200  # read-limited secrets the max_reads 1000000 cell asks for in turn
READS_THAT_LAST = 1_000_000  # the API's largest max_reads: no cell uses them up
# Fresh secrets for a cell whose every request uses one up: this many times the requests
# the cell is expected to take (from the plain fetch cell just before), and never fewer.
POOL_MARGIN = 1.5
MIN_POOL = 200
BASE_OPS = ("create", "fetch")  # what every configuration, the naive app too, serves
LIFECYCLE_OPS = (
    "fetch (max_reads 1000000)",
    "fetch (max_reads 1)",
    "delete",
    "create (receipt)",
    "create (idempotent)",
    "create (passphrase)",
    "fetch (passphrase)",
)
# Each request of these derives a key from its passphrase (scrypt, about 0.2 s of a core;
# at most two at once per process): a few requests a second. Measured last, each with a
# wrk timeout past the cell's end (a queued request waits seconds, and is no error), and
# drained: the server finishes what wrk left queued, charged to the cell (see measure).
PASSPHRASE_OPS = ("create (passphrase)", "fetch (passphrase)")
PASSPHRASE = "correct horse battery staple"  # noqa: S105 - the bench's own, in every body
PLAIN: dict[str, object] = {"secret": SECRET}
# The create bodies of the lifecycle's create rows (the idempotent one adds a header).
CREATE_BODIES: dict[str, dict[str, object]] = {
    "create (receipt)": {**PLAIN, "receipt": True, "label": "bench receipt"},
    "create (idempotent)": PLAIN,
    "create (passphrase)": {**PLAIN, "passphrase": PASSPHRASE},
}
# The passphrase fetch asks in turn for at most this many secrets (no read limit), those
# its create cell stored first, made up to min(connections, this) when it stored fewer:
# each made costs a derivation, so the untimed part stays a few seconds at most.
PASSPHRASE_POOL = 20
# Idempotency-Keys for the idempotent create cell, each sent once: this many times the
# requests the plain create cell took (a key repeated would be a replay, counted an error).
KEY_MARGIN = 4
SETTLE_SECONDS = 30.0  # the longest the bench waits for a server to finish a cell's queue
LOW_CONCURRENCY_FACTOR = 2  # a cell at one connection runs this many times --duration
FULL_STACK = "full stack"
NAIVE = "naive (2 sync inserts)"
# The naive app without the TTL index (on nx-27017 that index costs every read a purge,
# which a real mongod does not): what its reads cost on a server that does not do that.
NAIVE_NO_TTL = "naive, no TTL index"
# The same two on the service's embedded store: a SQLite file of their own per cell.
FULL_STACK_SQLITE = "full stack (sqlite)"
NAIVE_SQLITE = "naive (sqlite)"
# The full stack served by two worker processes (`serve --workers 2`), on each store: what a
# second core adds to one replica (docs/scaling.md).
FULL_STACK_2 = "full stack, 2 workers"
FULL_STACK_SQLITE_2 = "full stack (sqlite), 2 workers"
ECHO = "echo (floor)"
WEBHOOKS = "full stack + webhooks"
WEBHOOKS_HANGING = "full stack + webhooks, hanging receiver"
# Placeholders in a configuration's environment that each cell fills in (bench_config):
# the run's receivers, started by the run when a configuration names them, and its secret.
HEALTHY_RECEIVER = "$WEBHOOK_RECEIVER"
HANGING_RECEIVER = "$HANGING_RECEIVER"
WEBHOOK_SECRET = "$WEBHOOK_SECRET"  # noqa: S105 - a placeholder: each run makes its own
# The webhook tables of ratios, each printed when the run has both: (current, previous, what
# the ratio is).
WEBHOOK_COMPARISONS = (
    (WEBHOOKS, FULL_STACK, "webhooks on / off"),
    (WEBHOOKS_HANGING, FULL_STACK, "webhooks on, receiver hanging / off"),
    (WEBHOOKS_HANGING, WEBHOOKS, "receiver hanging / healthy"),
)
# After its cells, a server delivering to the healthy receiver has this long to empty its
# outbox (what it leaves is counted); the other configurations are stopped at once.
DRAIN_SECONDS = 30.0
ISSUE17_CONCURRENCY = (1, 20, 100)
ISSUE17_CONFIGS = (ECHO, FULL_STACK, NAIVE)
# Issue #27 sets #17's targets on both stores: MongoDB against the naive app with the TTL
# index (and, reported beside it, without), SQLite against its own naive app.
ISSUE27_CONFIGS = (ECHO, FULL_STACK, NAIVE, NAIVE_NO_TTL, FULL_STACK_SQLITE, NAIVE_SQLITE)
# The stores a configuration can run on (Config.store), and what --store names.
MONGO, SQLITE = "mongo", "sqlite"
STORES = {MONGO: (MONGO,), SQLITE: (SQLITE,), "both": (MONGO, SQLITE)}
# The ratio tables, each printed when the run has both: (full stack, its naive baseline of
# the same store, the line above the table).
RATIO_TABLES = (
    (FULL_STACK, NAIVE, f"MongoDB wire (nx-27017): {FULL_STACK!r} against {NAIVE!r}:"),
    (
        FULL_STACK,
        NAIVE_NO_TTL,
        f"MongoDB wire (nx-27017): {FULL_STACK!r} against {NAIVE_NO_TTL!r}:",
    ),
    (FULL_STACK_SQLITE, NAIVE_SQLITE, f"SQLite: {FULL_STACK_SQLITE!r} against {NAIVE_SQLITE!r}:"),
)


@dataclass(frozen=True)
class Config:
    name: str
    command: str  # "serve" or a loadtests.baselines app
    env: dict[str, str] = field(default_factory=dict)
    source: Path = ROOT  # the checkout whose packages the server imports (its PYTHONPATH)
    # MONGO: a fresh database on a MongoDB of its own per cell (the echo too, which uses
    # none); SQLITE: a fresh data directory per cell, the store inside the server process.
    store: str = MONGO
    args: tuple[str, ...] = ()  # more arguments of `serve`, such as ("--workers", "2")


FULL = {"RATE_LIMIT": "1000000/second"}  # the limiter runs but never refuses the benchmark
CONFIGS = [
    Config("echo (floor)", "echo"),
    Config("full stack", "serve", FULL),
    Config("full stack + shared counters", "serve", {**FULL, "RATE_LIMIT_STORAGE": "$MONGO_URI"}),
    Config("full stack - audit", "serve", {**FULL, "AUDIT_ENABLED": "false"}),
    Config("full stack - rate limit", "serve", {"RATE_LIMIT": "off"}),
    Config("full stack - metrics", "serve", {**FULL, "METRICS_ENABLED": "false"}),
    Config(
        "no middleware",
        "serve",
        {"RATE_LIMIT": "off", "AUDIT_ENABLED": "false", "METRICS_ENABLED": "false"},
    ),
    Config("full stack + tracing", "serve", {**FULL, "OTEL_TRACES_EXPORTER": "otlp"}),
    Config(
        WEBHOOKS,
        "serve",
        {**FULL, "WEBHOOK_URLS": HEALTHY_RECEIVER, "WEBHOOK_SECRET": WEBHOOK_SECRET},
    ),
    Config(
        WEBHOOKS_HANGING,
        "serve",
        {**FULL, "WEBHOOK_URLS": HANGING_RECEIVER, "WEBHOOK_SECRET": WEBHOOK_SECRET},
    ),
    Config(NAIVE, "naive"),
    Config(NAIVE_NO_TTL, "naive", {"NAIVE_TTL_INDEX": "0"}),
    Config(FULL_STACK_SQLITE, "serve", FULL, store=SQLITE),
    Config(NAIVE_SQLITE, "naive-sqlite", store=SQLITE),
    Config(FULL_STACK_2, "serve", FULL, args=("--workers", "2")),
    Config(FULL_STACK_SQLITE_2, "serve", FULL, store=SQLITE, args=("--workers", "2")),
]


def baseline_of(name: str) -> str:
    """The naive app a configuration's "req/s vs naive" divides by: its own store's."""
    sqlite = {c.name for c in CONFIGS if c.store == SQLITE}
    # Another revision's (--compare-source) is named after this one's: "full stack (sqlite) @…".
    return NAIVE_SQLITE if name.split(" @")[0] in sqlite else NAIVE


@dataclass
class Cell:
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_us: float
    errors: int
    db_cpu_us: float | None = None  # the cell's own nx-27017's, when the bench started it


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and of its live descendants (the workers of `serve
    --workers N`), from /proc."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        used[child] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    family = {pid}
    grew = True
    while grew:
        more = {child for child, parent in parents.items() if parent in family} - family
        grew = bool(more)
        family |= more
    return sum(used.get(member, 0.0) for member in family)


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@contextmanager
def otlp_sink() -> Iterator[str]:
    """A local endpoint that accepts OTLP/HTTP exports and discards them."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@contextmanager
def server(config: Config, env: dict[str, str], workdir: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    if config.command == "serve":
        command = [sys.executable, "-m", "vault", "serve", "--port", str(port), *config.args]
    else:
        command = [sys.executable, "-m", "loadtests.baselines", config.command, "--port", str(port)]
    log = (workdir / f"{config.command}-{port}.log").open("wb")
    # Exactly the configuration's checkout on the path: the server runs in the work
    # directory, where an editable install (of whichever checkout ran `pip install -e`)
    # would otherwise answer `import vault`, and the caller's PYTHONPATH may name another.
    env = {**env, **config.env, "PYTHONPATH": str(config.source)}
    process = subprocess.Popen(  # noqa: S603 - our own arguments, no shell
        command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + ("/healthz" if config.command == "serve" else "/"))
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def wrk(
    url: str,
    bodies: list[str],
    seconds: float,
    concurrency: int,
    workdir: Path,
    answers: Path | None = None,
    headers: list[str] | None = None,
    timeout: float | None = None,
) -> dict[str, int]:
    """Run wrk for ``seconds``, sending ``bodies`` in turn; return bench.lua's summary.
    With ``answers``, the secret_id of every 200 answer is appended to that file; with
    ``headers`` ("Name: value", one per body), each body's request carries its own; with
    ``timeout``, wrk waits that many seconds for an answer (else its 2 s)."""
    bodies_file = workdir / "bodies.jsonl"
    bodies_file.write_text("".join(body + "\n" for body in bodies))
    ids = [] if answers is None else [str(answers)]
    if headers is not None:
        if len(headers) != len(bodies):
            raise ValueError(f"{len(headers)} header lines for {len(bodies)} bodies")
        headers_file = workdir / "headers.txt"
        headers_file.write_text("".join(header + "\n" for header in headers))
        ids = [*(ids or ["-"]), str(headers_file)]
    waits = [] if timeout is None else ["--timeout", f"{math.ceil(timeout)}s"]
    result = subprocess.run(  # noqa: S603 - our own arguments, no shell
        [executable("wrk"), "-t1", f"-c{concurrency}", f"-d{seconds:g}s", *waits,
         "-s", str(SCRIPT), url, "--", str(bodies_file), *ids],
        capture_output=True, text=True, timeout=seconds + (timeout or 0) + 60, check=True,
    )  # fmt: skip
    summary: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def measure(
    url: str,
    pid: int,
    bodies: list[str],
    seconds: float,
    concurrency: int,
    workdir: Path,
    db_pid: int | None,
    answers: Path | None = None,
    headers: list[str] | None = None,
    timeout: float | None = None,
    drained: bool = False,
) -> Cell:
    """One cell: wrk's throughput and latencies, and the CPU per request of the server and
    the database. ``drained`` (requests that take seconds): the server then finishes what
    wrk left in flight, one request per connection, and the CPU is counted until it has,
    over the requests answered and those; else it is counted while wrk runs, over the
    requests answered (what a request left unanswered costs then is negligible)."""
    before = cpu_seconds(pid)
    db_before = cpu_seconds(db_pid) if db_pid else 0.0
    summary = wrk(url, bodies, seconds, concurrency, workdir, answers, headers, timeout)
    if drained:
        settle(pid)
    cpu = cpu_seconds(pid) - before
    db_cpu = cpu_seconds(db_pid) - db_before if db_pid else None
    requests = max(summary["requests"] + (concurrency if drained else 0), 1)
    answered = summary["requests"] - summary["status_errors"]  # 2xx and 3xx: none of ours is 3xx
    return Cell(
        rps=answered / (summary["duration_us"] / 1e6),
        p50_ms=summary["p50_us"] / 1000,
        p95_ms=summary["p95_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        cpu_us=cpu / requests * 1e6,
        errors=summary["status_errors"] + summary["socket_errors"],
        db_cpu_us=None if db_cpu is None else db_cpu / requests * 1e6,
    )


def created_ids(answers: Path, limit: int = 0) -> list[str]:
    """Ids of the secrets whose creates answered 200 into ``answers`` (``limit`` 0: all of
    them). Read from the answers, not the database: a store keeps only their digests."""
    if not answers.exists():
        return []
    ids = answers.read_text().split()
    return ids[:limit] if limit else ids


def fresh_secrets(
    url: str,
    body: dict[str, object],
    count: int,
    rate: float,
    concurrency: int,
    workdir: Path,
    answers: Path,
) -> list[str]:
    """Create at least ``count`` secrets with ``body`` (untimed, with wrk at about ``rate``
    per second); the ids of those it stored (their creates' answers, kept in ``answers``)."""
    before = set(created_ids(answers))
    new: list[str] = []
    while len(new) < count:
        seconds = math.ceil((count - len(new)) / max(rate, 50.0) * 1.2)
        wrk(
            url + "/vault/secret/create", [json.dumps(body)], seconds, concurrency, workdir,
            answers,
        )  # fmt: skip
        stored = [i for i in created_ids(answers) if i not in before]
        if len(stored) == len(new):
            raise ClusterError(f"{seconds}s of creates with {sorted(body)} stored nothing")
        new = stored
    return new


def seed_secrets(url: str, count: int, connections: int = SEED_CONNECTIONS) -> list[str]:
    """Store ``count`` secrets through the create endpoint at ``url`` (untimed,
    ``connections`` at once); their ids. None from a server whose answers name no secret
    (the echo); a ClusterError if the creates keep failing."""
    ids: list[str] = []
    lock = threading.Lock()

    def create(n: int) -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(n):
                answer = client.post(url, json={"secret": SECRET})
                secret_id = answer.json().get("secret_id") if answer.status_code == 200 else None
                if isinstance(secret_id, str):
                    with lock:
                        ids.append(secret_id)

    for _ in range(3):  # what failed is made up, twice at most
        missing = count - len(ids)
        shares = [missing // connections + (k < missing % connections) for k in range(connections)]
        threads = [threading.Thread(target=create, args=(n,)) for n in shares if n]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(ids) >= count or not ids:
            return ids
    raise ClusterError(f"only {len(ids)} of {count} creates stored a secret")


def bench_config(
    config: Config,
    env: dict[str, str],
    workdir: Path,
    seconds: float,
    concurrency: int,
    db_pid: int | None = None,
    lifecycle: tuple[str, ...] = LIFECYCLE_OPS,
    placeholders: Mapping[str, str] | None = None,
    drain: float = 0.0,
    fetch_secrets: int = FETCH_SECRETS,
) -> dict[str, Cell]:
    """Serve ``config`` on the store of ``env`` (``MONGO_URI`` and ``MONGO_DB``, or SQLite's
    ``DATA_DIR``) and measure its cells at ``concurrency``: create and fetch, then
    (``lifecycle``, the service only) the lifecycle's requests. ``db_pid``: the database
    process charged for them (none on SQLite: the store runs in the server's process).
    ``placeholders``: the values of the ``$NAME``s in its environment besides ``MONGO_URI``.
    ``drain``: seconds the server may then take to deliver its outbox before it stops.
    ``lifecycle``: the rows of LIFECYCLE_OPS to measure (none: create and fetch only).
    ``fetch_secrets``: how many secrets the fetch cell reads (stored for it, untimed)."""
    values = {"MONGO_URI": env.get("MONGO_URI", ""), **(placeholders or {})}
    config_env = {k: expand(v, values) for k, v in config.env.items()}
    with server(replace(config, env=config_env), env, workdir) as (url, pid):
        cells = measure_ops(
            config, url, pid, workdir, seconds, concurrency, db_pid, lifecycle, fetch_secrets
        )
        if drain:
            drain_outbox(env["MONGO_URI"], env["MONGO_DB"], drain)
        return cells


def measure_ops(
    config: Config,
    url: str,
    pid: int,
    workdir: Path,
    seconds: float,
    concurrency: int,
    db_pid: int | None,
    lifecycle: tuple[str, ...],
    fetch_secrets: int = FETCH_SECRETS,
) -> dict[str, Cell]:
    """The cells of ``config``, served at ``url`` by process ``pid``: see ``bench_config``."""
    created = httpx.post(url + "/vault/secret/create", json={"secret": SECRET}, timeout=10)
    secret_id = created.json().get("secret_id", str(uuid.uuid4()))
    fetch_url, create_url = url + "/vault/secret/fetch", url + "/vault/secret/create"
    delete_url = url + "/vault/secret/delete"
    wrk(fetch_url, [json.dumps({"secret_id": secret_id})], 1, concurrency, workdir)  # warm up

    def cell(target: str, ids: list[str]) -> Cell:
        bodies = [json.dumps({"secret_id": i}) for i in ids]
        return measure(target, pid, bodies, seconds, concurrency, workdir, db_pid)

    answers = workdir / "created-ids"
    answers.unlink(missing_ok=True)  # this configuration's own creates only
    # Fetches first, each of the secrets stored for them in turn (the echo stored none),
    # then creates: both cells of every configuration start on a collection of one size.
    fetched = cell(fetch_url, seed_secrets(create_url, fetch_secrets) or [secret_id])
    cells = {
        "create": measure(
            create_url, pid, [json.dumps({"secret": SECRET})], seconds, concurrency,
            workdir, db_pid, answers,
        ),
        "fetch": fetched,
    }  # fmt: skip
    if config.command.startswith("naive") or not lifecycle:
        return cells
    keys = max(MIN_POOL, math.ceil(cells["create"].rps * seconds * KEY_MARGIN))

    def run(op: str, ids: list[str], made: Path | None = None) -> Cell:
        """The cell of a lifecycle row without a pool of its own to make (made: where its
        creates' answers go); a passphrase row's is drained (see ``measure``)."""
        path, bodies, headers = op_requests(op, ids, keys)
        slow = op in PASSPHRASE_OPS
        return measure(
            url + path, pid, bodies, seconds, concurrency, workdir, db_pid, made, headers,
            timeout=seconds + 10 if slow else None, drained=slow,
        )  # fmt: skip

    if config.command == "echo":  # the same requests, answered back
        for op in lifecycle:
            cells[op] = run(op, [secret_id])
        return cells

    rate = max(cells["create"].rps, 1.0)
    # Each request of these cells uses a secret up: expect about the plain fetch's rate.
    needed = max(MIN_POOL, math.ceil(cells["fetch"].rps * seconds * POOL_MARGIN))
    if "fetch (max_reads 1000000)" in lifecycle:
        lasting = {"secret": SECRET, "max_reads": READS_THAT_LAST}
        pool = fresh_secrets(url, lasting, FETCH_POOL, rate, concurrency, workdir, answers)
        cells["fetch (max_reads 1000000)"] = cell(fetch_url, pool[:FETCH_POOL])
    if "fetch (max_reads 1)" in lifecycle:
        one_time = {"secret": SECRET, "max_reads": 1}
        pool = fresh_secrets(url, one_time, needed, rate, concurrency, workdir, answers)
        cells["fetch (max_reads 1)"] = cell(fetch_url, pool)
    if "delete" in lifecycle:
        pool = fresh_secrets(url, {"secret": SECRET}, needed, rate, concurrency, workdir, answers)
        cells["delete"] = cell(delete_url, pool)
    if "create (receipt)" in lifecycle:
        cells["create (receipt)"] = run("create (receipt)", [])
    if "create (idempotent)" in lifecycle:
        made = workdir / "idempotent-ids"
        measured = run("create (idempotent)", [], made)
        # A key sent twice is answered with the first create's secret_id (a replay, no
        # second secret): not what the row measures, so each repeat counts as an error.
        stored = created_ids(made)
        cells["create (idempotent)"] = replace(
            measured, errors=measured.errors + len(stored) - len(set(stored))
        )
    if "create (passphrase)" in lifecycle:
        made = workdir / "passphrase-ids"
        cells["create (passphrase)"] = run("create (passphrase)", [], made)
        if "fetch (passphrase)" in lifecycle:
            pool, missing = passphrase_pool(created_ids(made), concurrency)
            pool += [passphrase_secret(url) for _ in range(missing)]
            cells["fetch (passphrase)"] = run("fetch (passphrase)", pool)
    return cells


def op_requests(op: str, ids: list[str], keys: int) -> tuple[str, list[str], list[str] | None]:
    """A lifecycle row's path, request bodies and per-request headers: a create row's body
    (with ``keys`` Idempotency-Keys, one per request, for the idempotent one), or a body per
    secret of ``ids`` for a fetch or delete (with the passphrase for the passphrase fetch)."""
    if op in CREATE_BODIES:
        body = json.dumps(CREATE_BODIES[op])
        if op == "create (idempotent)":
            headers = [f"Idempotency-Key: {uuid.uuid4()}" for _ in range(keys)]
            return "/vault/secret/create", [body] * keys, headers
        return "/vault/secret/create", [body], None
    extra = {"passphrase": PASSPHRASE} if op == "fetch (passphrase)" else {}
    path = "/vault/secret/delete" if op == "delete" else "/vault/secret/fetch"
    return path, [json.dumps({"secret_id": i, **extra}) for i in ids], None


def passphrase_pool(stored: list[str], concurrency: int) -> tuple[list[str], int]:
    """The secrets the passphrase fetch asks for in turn: those its create cell stored, at
    most PASSPHRASE_POOL; and how many more to make (each one a derivation) so that up to
    that many connections each ask a secret of their own."""
    pool = stored[:PASSPHRASE_POOL]
    return pool, max(0, min(concurrency, PASSPHRASE_POOL) - len(pool))


def passphrase_secret(url: str) -> str:
    """One secret made with the bench's passphrase (untimed): its id."""
    created = httpx.post(
        url + "/vault/secret/create", json=CREATE_BODIES["create (passphrase)"], timeout=60
    )
    created.raise_for_status()
    return str(created.json()["secret_id"])


def settle(pid: int, seconds: float = SETTLE_SECONDS) -> None:
    """Wait, ``seconds`` at most, until process ``pid`` is idle (under a tenth of a core
    for a quarter of a second): a server still works through the requests a cell left
    queued when wrk stopped (passphrase derivations, 0.2 s each), which would otherwise
    run in the next cell and be charged to it."""
    deadline = time.monotonic() + seconds
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_seconds(pid)
        if now - before < 0.025:
            return
        before = now


def expand(value: str, values: Mapping[str, str]) -> str:
    """``value`` with each ``$NAME`` of ``values`` replaced by its value."""
    for name, text in values.items():
        value = value.replace(f"${name}", text)
    return value


def outbox_count(client: pymongo.MongoClient[dict[str, object]], database: str) -> int:
    """The events in the outbox of ``database``: not yet delivered to every receiver."""
    return int(client[database]["outbox"].count_documents({}))


def drain_outbox(mongo_uri: str, database: str, seconds: float) -> int:
    """Wait, ``seconds`` at most, until the outbox of ``database`` is empty (its server
    delivered every event its cells made); the events it still holds."""
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(mongo_uri)
    try:
        outbox = client[database]["outbox"]
        deadline = time.monotonic() + seconds
        # Polled with find_one, counted once: nx-27017 counts by reading every document
        # (13 ms of its CPU for 1,000 events), which would slow the deliveries it waits for.
        while outbox.find_one({}, {"_id": 1}) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        return outbox_count(client, database)
    finally:
        client.close()


def delivers_to(config: Config, placeholder: str) -> bool:
    """Whether ``config``'s webhooks go to the receiver of ``placeholder``."""
    return placeholder in config.env.get("WEBHOOK_URLS", "")


def databases(mongo_uri: str) -> list[str]:
    """The databases the server at ``mongo_uri`` holds, its own (admin, local, config) aside."""
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(mongo_uri)
    try:
        return sorted(set(client.list_database_names()) - {"admin", "local", "config"})
    finally:
        client.close()


def bench_cell(
    config: Config,
    base_env: dict[str, str],
    mongo_uri: str | None,
    workdir: Path,
    seconds: float,
    concurrency: int,
    lifecycle: tuple[str, ...],
    progress: str,
    placeholders: Mapping[str, str] | None = None,
    receiver: Receiver | None = None,
    fetch_secrets: int = FETCH_SECRETS,
) -> tuple[dict[str, Cell], Deliveries | None]:
    """One configuration at one concurrency in one round, on a fresh database of a MongoDB of
    its own: ``mongo_uri``'s when given, else an nx-27017 started for it in ``workdir`` (a
    directory of its own) and stopped once its cells are measured. Reports on stderr the
    server it ran on and, for its own nx-27017, the databases that server held at the end.
    With ``receiver`` (the one its webhooks go to), also what that receiver got from it,
    after its server had up to DRAIN_SECONDS to deliver its outbox, and what it left there.
    A SQLite configuration runs on a data directory made for it in ``workdir`` instead, and
    reports the files it held at the end."""
    workdir.mkdir()
    if config.store == SQLITE:
        return sqlite_cell(
            config, base_env, workdir, seconds, concurrency, lifecycle, progress, fetch_secrets
        )
    database = "bench" + uuid.uuid4().hex[:8]
    with mongodb(mongo_uri, workdir) as uri:
        db_pid = nx_pid(workdir)
        where = "--mongo-uri" if db_pid is None else f"nx-27017 pid {db_pid} ({uri})"
        print(
            f"{progress}: {config.name}, {concurrency} connection(s), database {database} "
            f"on {where}",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        env = {**base_env, "MONGO_URI": uri, "MONGO_DB": database}
        drain = DRAIN_SECONDS if receiver is not None else 0.0
        cells = bench_config(
            config, env, workdir, seconds, concurrency, db_pid, lifecycle, placeholders, drain,
            fetch_secrets,
        )  # fmt: skip
        deliveries = None
        if receiver is not None:  # its server stopped: every answered delivery is in
            left = drain_outbox(uri, database, 0)
            deliveries = Deliveries.of(receiver.take(), undelivered=left)
        if db_pid is not None:
            held = ", ".join(databases(uri)) or "none"
            print(f"  nx-27017 pid {db_pid} held databases: {held}", file=sys.stderr, flush=True)
    return cells, deliveries


def sqlite_cell(
    config: Config,
    base_env: dict[str, str],
    workdir: Path,
    seconds: float,
    concurrency: int,
    lifecycle: tuple[str, ...],
    progress: str,
    fetch_secrets: int = FETCH_SECRETS,
) -> tuple[dict[str, Cell], None]:
    """``bench_cell`` for a SQLite configuration: a data directory that did not exist before
    this cell (DATA_DIR), no MongoDB; DB CPU is not measured apart (it is the server's)."""
    data = workdir / "data"
    print(
        f"{progress}: {config.name}, {concurrency} connection(s), fresh data directory {data}",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    env = {**base_env, "DATA_DIR": str(data)}
    cells = bench_config(
        config, env, workdir, seconds, concurrency, None, lifecycle, fetch_secrets=fetch_secrets
    )
    held = ", ".join(sorted(path.name for path in data.glob("*.db"))) or "none"
    print(f"  data directory {data} held: {held}", file=sys.stderr, flush=True)
    return cells, None


def notes(own_servers: bool, compared: list[Config], sqlite: bool = False) -> str:
    """What the tables were measured on, printed above them: the code and the stores."""
    at = revision(ROOT)
    code = f"The servers imported the service from {ROOT}" + (f" (@{at})" if at else "")
    code += "".join(f";\n{c.name!r} from {c.source}" for c in compared) + ".\n"
    if sqlite:
        code += (
            "The SQLite configurations ran each on a data directory of their own, made fresh\n"
            "for every cell (round, configuration, connection count); their store works in\n"
            "the server's process, so its CPU is in the server's and DB CPU shows '-'.\n"
        )
    if not own_servers:
        which = "The MongoDB configurations" if sqlite else "Every configuration"
        return code + (
            f"{which} ran on the MongoDB of --mongo-uri, each cell on a fresh\n"
            "database; DB CPU is not measured (that server is no process of this run)."
        )
    which = "Each MongoDB configuration (and the echo)" if sqlite else "Each configuration"
    return code + textwrap.fill(
        f"{which} ran on an nx-27017 of its own, started fresh for it in every round and at "
        "every connection count (its own data directory and port) and stopped after its "
        "cells; DB CPU is that server's process. nx-27017 purges every TTL-indexed "
        "collection it holds, in any database, on each find (two scans each), which a real "
        "mongod never does on a read (its TTL monitor deletes in the background, once a "
        "minute): on one shared server, each configuration's reads would pay for the "
        "collections the others left behind. nx-27017 is also one process over SQLite with "
        "no replica set: w='majority' is acknowledged by that one server, and j=True makes "
        "it commit with SQLite's synchronous=FULL, where a mongod replica set would wait "
        "for a majority of its members and their journals.",
        width=88,
        break_on_hyphens=False,
    )


def median_cell(cells: list[Cell]) -> Cell:
    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    return Cell(
        rps=med([c.rps for c in cells]),
        p50_ms=med([c.p50_ms for c in cells]),
        p95_ms=med([c.p95_ms for c in cells]),
        p99_ms=med([c.p99_ms for c in cells]),
        cpu_us=med([c.cpu_us for c in cells]),
        errors=sum(c.errors for c in cells),
        db_cpu_us=None
        if any(c.db_cpu_us is None for c in cells)
        else med([c.db_cpu_us for c in cells if c.db_cpu_us is not None]),
    )


# results[concurrency][configuration][op]: one run's cells (or their medians)
Results = dict[int, dict[str, dict[str, Cell]]]


def rate(per_second: float) -> str:
    """Requests a second as the tables print them: whole above 10, else to a tenth (a
    passphrase row's few a second, or fewer on a loaded machine, are not rounded away)."""
    return f"{per_second:.0f}" if per_second >= 10 else f"{per_second:.1f}"


def table(results: Results) -> str:
    """Every cell, by concurrency, then configuration, then op; ratios within a concurrency."""
    lines = [
        "| connections | configuration | op | req/s | p50 ms | p95 ms | p99 ms | CPU µs/req "
        "| CPU vs echo | req/s vs naive | DB CPU µs/req | errors |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency, by_config in results.items():
        floor = by_config[ECHO]
        for name, cells in by_config.items():
            naive = by_config.get(baseline_of(name))  # the naive app of its own store
            for op, cell in cells.items():
                vs_naive = (
                    f"{ratio(cell.rps, naive[op].rps):.2f}x" if naive and op in naive else "-"
                )
                db_cpu = "-" if cell.db_cpu_us is None else f"{cell.db_cpu_us:.0f}"
                lines.append(
                    f"| {concurrency} | {name} | {op} | {rate(cell.rps)} | {cell.p50_ms:.1f} "
                    f"| {cell.p95_ms:.1f} | {cell.p99_ms:.1f} | {cell.cpu_us:.0f} "
                    f"| {ratio(cell.cpu_us, floor[op].cpu_us):.2f}x | {vs_naive} | {db_cpu} "
                    f"| {cell.errors} |"
                )
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One of the targets of issues #17 and #27 (the same): the full stack's ratio to the
    naive app of its store on ``metric`` must be at least (``at_least``) or at most
    ``bound``."""

    metric: str  # "req/s", "p50", "p99" or "CPU/req"
    bound: float
    at_least: bool

    def met(self, value: float) -> bool:
        """Whether a measured ratio meets the target (a ratio on the bound meets it)."""
        return value >= self.bound if self.at_least else value <= self.bound

    def __str__(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.bound:g}x"


# The targets per connection count, issue #17's and #27's alike: full stack against the
# naive app of the same store, create and fetch.
_UNDER_LOAD = (Target("req/s", 1.5, True), Target("p99", 1.0, False), Target("CPU/req", 0.6, False))
TARGETS: dict[int, tuple[Target, ...]] = {
    1: (Target("req/s", 1.0, True), Target("p50", 1.0, False)),
    20: _UNDER_LOAD,
    100: _UNDER_LOAD,
}
RATIO_METRICS = ("req/s", "p50", "p99", "CPU/req")


def ratio(value: float, base: float) -> float:
    """``value / base``; infinite when the base is 0 (a cell that measured nothing)."""
    return value / base if base else math.inf


def ratios(full: Cell, naive: Cell) -> dict[str, float]:
    """The full stack's cell against the naive app's, per metric of RATIO_METRICS, to the
    two decimals the table prints: a verdict follows the number the reader sees."""
    return {
        "req/s": round(ratio(full.rps, naive.rps), 2),
        "p50": round(ratio(full.p50_ms, naive.p50_ms), 2),
        "p99": round(ratio(full.p99_ms, naive.p99_ms), 2),
        "CPU/req": round(ratio(full.cpu_us, naive.cpu_us), 2),
    }


def verdicts(concurrency: int, measured: dict[str, float]) -> dict[str, bool]:
    """Met (True) or not, for each target #17 and #27 set at ``concurrency`` (none: empty)."""
    return {t.metric: t.met(measured[t.metric]) for t in TARGETS.get(concurrency, ())}


def ratio_table(results: Results, naive: str = NAIVE, full: str = FULL_STACK) -> str | None:
    """``full`` / ``naive`` per op and concurrency, beside the targets (#17's, #27's), each
    met or not met; None when the run lacks one of the two."""
    rows: list[str] = []
    for op in BASE_OPS:  # the only ops the naive app serves
        for concurrency, by_config in results.items():
            if full not in by_config or naive not in by_config:
                continue
            measured = ratios(by_config[full][op], by_config[naive][op])
            met = verdicts(concurrency, measured)
            targets = {t.metric: t for t in TARGETS.get(concurrency, ())}
            cells = []
            for metric in RATIO_METRICS:
                text = f"{measured[metric]:.2f}x"
                if metric in targets:
                    text += f" ({targets[metric]}: {'met' if met[metric] else 'not met'})"
                cells.append(text)
            summary = f"{sum(met.values())} of {len(met)}" if met else "-"
            rows.append(f"| {op} | {concurrency} | {' | '.join(cells)} | {summary} |")
    if not rows:
        return None
    return "\n".join(
        [
            "| op | connections | req/s vs naive | p50 vs naive | p99 vs naive "
            "| CPU/req vs naive | targets met |",
            "|---|---:|---|---|---|---|---:|",
            *rows,
        ]
    )


def comparison_table(results: Results, previous: str, current: str = FULL_STACK) -> str | None:
    """``current`` / ``previous`` (another revision's full stack) per op and concurrency, on
    the ratio table's metrics and the database's CPU per request; no targets, these are
    before and after. None when the run lacks one of the two."""
    pairs = {
        n: (by_config[current], by_config[previous])
        for n, by_config in results.items()
        if current in by_config and previous in by_config
    }
    ops = list(dict.fromkeys(op for now, then in pairs.values() for op in now if op in then))
    tag = previous.removeprefix(FULL_STACK).strip() or previous
    rows: list[str] = []
    for op in ops:
        for concurrency, (now, then) in pairs.items():
            measured = ratios(now[op], then[op])
            db_now, db_then = now[op].db_cpu_us, then[op].db_cpu_us
            db = "-" if db_now is None or db_then is None else f"{ratio(db_now, db_then):.2f}x"
            cells = [f"{measured[metric]:.2f}x" for metric in RATIO_METRICS] + [db]
            rows.append(f"| {op} | {concurrency} | {' | '.join(cells)} |")
    if not rows:
        return None
    columns = [f"{metric} vs {tag}" for metric in (*RATIO_METRICS, "DB CPU/req")]
    return "\n".join(
        [
            f"| op | connections | {' | '.join(columns)} |",
            "|---|---:|" + "---|" * len(columns),
            *rows,
        ]
    )


def plain_of(op: str) -> str:
    """The plain request a lifecycle row is compared with: a create row with the create,
    the others (fetches, delete) with the fetch."""
    return "create" if op.startswith("create") else "fetch"


def lifecycle_table(results: Results) -> str | None:
    """Each lifecycle row of each service configuration against the plain create or fetch
    of the same configuration, concurrency and run (row / plain): throughput, p50, server
    and database CPU per request. None without lifecycle rows."""
    rows: list[str] = []
    for concurrency, by_config in results.items():
        for name, cells in by_config.items():
            if name == ECHO:
                continue
            for op in LIFECYCLE_OPS:
                if op not in cells:
                    continue
                row, plain = cells[op], cells[plain_of(op)]
                db = (
                    "-"
                    if row.db_cpu_us is None or plain.db_cpu_us is None
                    else f"{ratio(row.db_cpu_us, plain.db_cpu_us):.2f}x"
                )
                rows.append(
                    f"| {concurrency} | {name} | {op} | {plain_of(op)} "
                    f"| {ratio(row.rps, plain.rps):.2f}x | {ratio(row.p50_ms, plain.p50_ms):.2f}x "
                    f"| {ratio(row.cpu_us, plain.cpu_us):.2f}x "
                    f"| {row.cpu_us - plain.cpu_us:+.0f} | {db} |"
                )
    if not rows:
        return None
    return "\n".join(
        [
            "| connections | configuration | op | against | req/s vs plain | p50 vs plain "
            "| CPU/req vs plain | CPU µs/req more | DB CPU/req vs plain |",
            "|---:|---|---|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )


def deliveries_table(by_concurrency: Mapping[int, Deliveries]) -> str | None:
    """The healthy receiver's deliveries per concurrency, every round's together: how many
    (and of which event types), how many repeated a webhook-id, the time from each event's
    change to the receiver's 200 (p50, p99, max), and the events left in the outboxes when
    their servers stopped. None without deliveries."""
    rows: list[str] = []
    for concurrency, run in by_concurrency.items():
        types = ", ".join(f"{name} {count}" for name, count in sorted(run.types.items()))
        latency = [percentile(run.latencies_ms, q) for q in (0.5, 0.99, 1.0)]
        rows.append(
            f"| {concurrency} | {run.count} | {types or '-'} | {run.duplicates} "
            f"| {' | '.join('-' if math.isnan(ms) else f'{ms:.1f}' for ms in latency)} "
            f"| {run.undelivered} |"
        )
    if not rows:
        return None
    return "\n".join(
        [
            "| connections | deliveries | by event type | duplicate webhook-ids "
            "| p50 ms | p99 ms | max ms | left undelivered |",
            "|---:|---:|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )


def webhook_secret() -> str:
    """A signing secret in the whsec_ form, fresh for the run."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def compared_configs(parser: argparse.ArgumentParser, sources: list[Path]) -> list[Config]:
    """``--compare-source``: the full stack of each checkout, named by its revision."""
    configs: list[Config] = []
    for source in sources:
        if not (source / "vault").is_dir():
            parser.error(f"--compare-source {source}: no vault package there (a checkout?)")
        source = source.resolve()
        name = f"{FULL_STACK} @{revision(source) or source.name}"
        if any(c.name == name for c in configs):
            parser.error(f"--compare-source: two checkouts are both {name!r}")
        configs.append(Config(name, "serve", FULL, source=source))
    return configs


def concurrency_list(text: str) -> list[int]:
    """``--concurrency``: one positive number of connections or a comma list of them."""
    try:
        values = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected a number of connections, or a comma list")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} names a number of connections twice")
    return values


def rotated(items: list[T], by: int) -> list[T]:
    """``items`` starting at position ``by`` (modulo their number), wrapping around."""
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


def schedule(configs: list[T], concurrencies: list[int], rounds: int) -> list[tuple[int, T, int]]:
    """(round, configuration, concurrency) in the order the run measures them.

    Per round, each concurrency in turn has every configuration measured one after the
    other, so the cells compared with each other are close in time; both orders rotate
    from round to round, so none always goes first (on a cold or a busy machine)."""
    return [
        (number, config, concurrency)
        for number in range(rounds)
        for concurrency in rotated(concurrencies, number)
        for config in rotated(configs, number)
    ]


def cell_seconds(duration: float, concurrency: int) -> float:
    """A cell's length: one connection takes requests one at a time, so it runs longer."""
    return duration * LOW_CONCURRENCY_FACTOR if concurrency == 1 else duration


def selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """Apply a preset (``--issue17``, ``--issue27``) to ``args`` and check the names and stores
    asked for; the stores whose configurations run."""
    if args.issue17 and args.issue27:
        parser.error("--issue17 and --issue27 are two presets: give one")
    preset = "--issue17" if args.issue17 else "--issue27" if args.issue27 else None
    if preset:
        given = [
            flag
            for flag, value in (("--concurrency", args.concurrency), ("--only", args.only),
                                ("--lifecycle", args.lifecycle))
            if value is not None
        ]  # fmt: skip
        if args.issue17 and args.store is not None:
            given.append("--store")  # #17's table is MongoDB's
        if given:
            parser.error(f"{preset} sets {', '.join(given)} itself")
        args.concurrency, args.lifecycle = list(ISSUE17_CONCURRENCY), False
        args.only = list(ISSUE17_CONFIGS if args.issue17 else ISSUE27_CONFIGS)
    stores = STORES[args.store or "both"]
    unknown = sorted(set(args.only or ()) - {c.name for c in CONFIGS})
    if unknown:
        names = ", ".join(repr(c.name) for c in CONFIGS)
        parser.error(f"--only: no configuration named {', '.join(map(repr, unknown))} ({names})")
    if not preset:
        elsewhere = [
            c.name
            for c in CONFIGS
            if c.name in (args.only or ()) and c.name != ECHO and c.store not in stores
        ]
        if elsewhere:
            names = ", ".join(map(repr, elsewhere))
            parser.error(f"--only {names}: not a configuration of --store {args.store}")
    if args.compare_source and MONGO not in stores:
        parser.error(f"--compare-source adds {FULL_STACK!r} (MongoDB): not with --store sqlite")
    return stores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=5.0,
        help=f"seconds of load per cell (5; {LOW_CONCURRENCY_FACTOR}x that at 1 connection)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=concurrency_list, default=None,
        help="connections, or a comma list of them, e.g. 1,20,100 (20)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (3)")
    parser.add_argument(
        "--fetch-secrets", type=positive_int, default=FETCH_SECRETS, metavar="N",
        help=f"secrets stored (untimed) for each fetch cell to read in turn ({FETCH_SECRETS})",
    )  # fmt: skip
    parser.add_argument(
        "--mongo-uri", default=os.environ.get("MONGO_URI"),
        help="a MongoDB every cell uses, each on a fresh database (MONGO_URI; else each "
        "cell gets an nx-27017 of its own)",
    )  # fmt: skip
    parser.add_argument("--only", nargs="*", help="configuration names to run (all)")
    parser.add_argument(
        "--store", choices=sorted(STORES), default=None,
        help="run the configurations of this store only: mongo (MongoDB wire), sqlite "
        "(embedded), or both (both; the echo floor always runs)",
    )  # fmt: skip
    parser.add_argument(
        "--lifecycle", action=argparse.BooleanOptionalAction, default=None,
        help="also measure the lifecycle's requests on the service (on)",
    )  # fmt: skip
    parser.add_argument(
        "--passphrase", action=argparse.BooleanOptionalAction, default=True,
        help="with the lifecycle, also measure the passphrase rows: a few requests a second, "
        "each one a scrypt derivation (on)",
    )  # fmt: skip
    parser.add_argument(
        "--issue17", action="store_true",
        help="issue #17's table: --concurrency 1,20,100 --only "
        f"{' '.join(repr(n) for n in ISSUE17_CONFIGS)} --no-lifecycle",
    )  # fmt: skip
    parser.add_argument(
        "--issue27", action="store_true",
        help="issue #27's tables, both stores: --concurrency 1,20,100 --only "
        f"{' '.join(repr(n) for n in ISSUE27_CONFIGS)} --no-lifecycle (narrow to one store "
        "with --store)",
    )  # fmt: skip
    parser.add_argument(
        "--compare-source", action="append", type=Path, default=[], metavar="DIR",
        help="a checkout of another revision (git worktree add DIR COMMIT): adds its full "
        "stack (and its SQLite one, when the run has it), served with PYTHONPATH=DIR, and "
        "this one's / its ratios (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    stores = selection(parser, args)
    concurrencies: list[int] = args.concurrency or [20]
    lifecycle = tuple(
        op
        for op in LIFECYCLE_OPS
        if args.lifecycle is not False and (args.passphrase or op not in PASSPHRASE_OPS)
    )
    if not args.duration > 0:
        parser.error("--duration must be a positive number of seconds")
    if args.duration != int(args.duration):
        # wrk's -d takes whole seconds only: "2.5s" is a usage error after the servers started.
        parser.error("--duration must be a whole number of seconds (wrk takes no fractions)")
    compared = compared_configs(parser, args.compare_source)
    try:
        executable("wrk")
    except ClusterError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    # The floor always runs; so does the full stack when another revision's compares with it.
    always = {ECHO, FULL_STACK} if compared else {ECHO}
    configs = [
        c
        for c in CONFIGS
        if c.name in always or ((not args.only or c.name in args.only) and c.store in stores)
    ]
    after_full = [c.name for c in configs].index(FULL_STACK) + 1 if compared else 0
    configs[after_full:after_full] = compared  # measured right after it in every round
    if compared and FULL_STACK_SQLITE in [c.name for c in configs]:  # its SQLite one too
        after_full = [c.name for c in configs].index(FULL_STACK_SQLITE) + 1
        configs[after_full:after_full] = [
            replace(c, name=c.name.replace(FULL_STACK, FULL_STACK_SQLITE, 1), store=SQLITE)
            for c in compared
        ]
    runs: dict[tuple[int, str], list[dict[str, Cell]]] = {
        (n, c.name): [] for n in concurrencies for c in configs
    }
    deliveries: dict[int, Deliveries] = {}  # the healthy receiver's, by concurrency
    with tempfile.TemporaryDirectory(prefix="secret-manager-bench-") as tmp:
        workdir = Path(tmp)
        with otlp_sink() as sink, ExitStack() as helpers:
            # The webhook receivers, each only when a configuration delivers to it.
            healthy = hanging = None
            if any(delivers_to(c, HEALTHY_RECEIVER) for c in configs):
                healthy = helpers.enter_context(receiver(hang=False))
            if any(delivers_to(c, HANGING_RECEIVER) for c in configs):
                hanging = helpers.enter_context(receiver(hang=True))
            placeholders = {name.lstrip("$"): value for name, value in (
                (WEBHOOK_SECRET, webhook_secret()),
                (HEALTHY_RECEIVER, healthy.url if healthy else ""),
                (HANGING_RECEIVER, hanging.url if hanging else ""),
            )}  # fmt: skip
            base_env = {
                key: value
                for key, value in os.environ.items()
                if not key.startswith(
                    ("MASTER_KEY", "MONGO", "OTEL_", "AUDIT", "RATE_LIMIT", "WEBHOOK", "DATA_DIR")
                )
            }
            base_env.update(
                MASTER_KEY=generate_key(), LOG_LEVEL="WARNING", OTEL_EXPORTER_OTLP_ENDPOINT=sink
            )
            try:
                for config in compared:
                    check_source(config.source, base_env, workdir)
            except ClusterError as exc:
                print(f"bench: {exc}", file=sys.stderr)
                return 2
            order = schedule(configs, concurrencies, args.rounds)
            for index, (number, config, concurrency) in enumerate(order, 1):
                got = healthy if delivers_to(config, HEALTHY_RECEIVER) else None
                cells, run = bench_cell(
                    config, base_env, args.mongo_uri, workdir / f"cell-{index}",
                    cell_seconds(args.duration, concurrency), concurrency, lifecycle,
                    progress=f"round {number + 1}", placeholders=placeholders, receiver=got,
                    fetch_secrets=args.fetch_secrets,
                )  # fmt: skip
                runs[concurrency, config.name].append(cells)
                if run is not None:
                    deliveries.setdefault(concurrency, Deliveries()).add(run)
            hung = hanging.accepted if hanging else None
    results: Results = {
        n: {
            c.name: {op: median_cell([r[op] for r in runs[n, c.name]]) for op in runs[n, c.name][0]}
            for c in configs
        }
        for n in concurrencies
    }
    sqlite = any(c.store == SQLITE for c in configs)
    compared = [c for c in configs if c.source != ROOT]
    print(notes(own_servers=not args.mongo_uri, compared=compared, sqlite=sqlite))
    print()
    print(table(results))
    costs = lifecycle_table(results)
    if costs is not None:
        print()
        print(
            "Each lifecycle row against the plain create or fetch of its configuration "
            "(row / plain):"
        )
        print()
        print(costs)
    for full, naive, heading in RATIO_TABLES:
        ratios_text = ratio_table(results, naive, full)
        if ratios_text is not None:
            print()
            print(heading)
            print()
            print(ratios_text)
    for config in compared:
        current = FULL_STACK_SQLITE if config.store == SQLITE else FULL_STACK
        text = comparison_table(results, config.name, current=current)
        if text is not None:
            print()
            print(f"This checkout's {current!r} against {config.name!r} (current / previous):")
            print()
            print(text)
    for current, previous, what in WEBHOOK_COMPARISONS:
        text = comparison_table(results, previous, current=current)
        if text is not None:
            print()
            print(f"{current!r} against {previous!r} ({what}):")
            print()
            print(text)
    delivered = deliveries_table(deliveries)
    if delivered is not None:
        print()
        print(
            f"Deliveries to the healthy receiver ({WEBHOOKS!r}, every round together), from "
            "each event's\ntimestamp (its change) to the receiver's 200:"
        )
        print()
        print(delivered)
    if hung is not None:
        print()
        print(f"The hanging receiver accepted {hung} connections and answered none.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
