"""Benchmark: ``secret-manager export`` and ``import`` at scale, wall time and peak memory.

For each size it fills a fresh SQLite store with that many sealed secrets (random 32-byte
plaintexts, sealed under a generated key; a quarter each with no limit, an expiry days
ahead, a read limit, or both) and one audit record per secret, written in batches through
``SQLiteBulk`` rather than over HTTP. It then runs each step as a real ``python -m vault``
process, timing it and reading that process's own peak RSS (``ru_maxrss`` from ``wait4``):

- ``export --audit`` from SQLite to a file;
- ``import`` of that file into a fresh SQLite data directory;
- ``import`` of that file into a fresh MongoDB database;
- ``export --audit`` from that MongoDB database to a file;
- the migration pipe ``export --audit | import``, SQLite to a fresh MongoDB database (or
  to SQLite with ``--pipe-to sqlite``), each process measured on its own.

Besides wall time and peak RSS it reports each step's CPU time (user + system) and, when
it started the nx-27017 server itself, that server's CPU during the step: which of the two
sets the rate. Every count in the summary lines must equal the size, the stores must hold
that many records, and the files exported from SQLite and from MongoDB must carry the same
secret lines and audit record ids (not the same audit lines: MongoDB keeps an audit
record's time to the millisecond only); any difference fails the run. It prints a
markdown table::

    python -m loadtests.transfer                          # 200,000 records
    python -m loadtests.transfer --sizes 20000,200000     # is peak memory flat as N grows?
    python -m loadtests.transfer --records 2000 --mongo-uri mongodb://127.0.0.1:27017/

Without ``--mongo-uri`` (or ``MONGO_URI``) it starts an nx-27017 server of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymongo
from bson import ObjectId

from loadtests.bench import cpu_seconds
from loadtests.mongo import mongodb, nx_pid
from loadtests.processes import ClusterError, log, positive_int
from middleware.outcomes import outcome_for_status
from vault.crypto import Keyring, derive_audit_key, generate_key, parse_key, secret_id_hmac
from vault.records import StoredSecret, record_key
from vault.stores.sqlite import SQLiteBulk

FILL_BATCH = 5000  # records per SQLiteBulk call while filling
STEP_TIMEOUT = 1800.0  # seconds one step may take before it is killed and the run fails
MIB = 1024  # ru_maxrss is in KiB on Linux

EXPORT_SUMMARY = re.compile(r"exported (\d+) secrets and (\d+) audit records .*; SHA-256 (\w+)")
IMPORT_SUMMARY = re.compile(
    r"secrets (\d+) new, (\d+) already there, (\d+) with fewer reads left, (\d+) expired "
    r"since the export, (\d+) conflicts; audit records (\d+) new, (\d+) already there"
)


@dataclasses.dataclass(frozen=True)
class Step:
    """One measured process: what it carried, how long it took, its own peak RSS."""

    name: str
    secrets: int
    audit: int
    seconds: float
    peak_rss_kib: int
    cpu_seconds: float  # the step's process, user + system
    db_cpu_seconds: float | None  # the nx-27017 server's meanwhile, when this run started it

    @property
    def rate(self) -> float:
        return (self.secrets + self.audit) / max(self.seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class Finished:
    """A step's exit: its status, wall time, peak RSS, CPU time, standard error."""

    returncode: int
    seconds: float
    peak_rss_kib: int
    cpu_seconds: float
    stderr: str


# ---- filling the source store ---------------------------------------------------------


def fill(path: Path, records: int, *, seed: int = 14) -> None:
    """A fresh SQLite store at ``path`` with ``records`` live secrets and as many audit
    records, written a batch per transaction; none expires or runs out during a run."""
    rng = random.Random(seed)  # noqa: S311 - the records' mix, not their secrets
    master = parse_key(generate_key())
    keyring = Keyring(master)
    audit_key = derive_audit_key(master)
    now = dt.datetime.now(dt.UTC)
    store = SQLiteBulk(path, create=True, timeout=30)
    try:
        for start in range(0, records, FILL_BATCH):
            secrets: list[StoredSecret] = []
            audit: list[dict[str, Any]] = []
            for index in range(start, min(start + FILL_BATCH, records)):
                secret_id = str(uuid.uuid4())
                sealed = keyring.seal(record_key(secret_id), os.urandom(32))
                # The lifecycle mix: none, an expiry, a read limit, or both.
                expires = None
                if index % 4 in (1, 3):
                    expires = now.replace(microsecond=0) + dt.timedelta(
                        seconds=rng.randrange(86_400, 30 * 86_400)
                    )
                reads_left = rng.randrange(1, 11) if index % 4 in (2, 3) else None
                sealed = dataclasses.replace(sealed, expires_at=expires, reads_left=reads_left)
                # Stores keep created_at to the millisecond.
                created = now - dt.timedelta(milliseconds=rng.randrange(1, 30 * 86_400_000))
                secrets.append(StoredSecret(sealed, created))
                audit.append(_audit_document(rng, audit_key, secret_id, created))
            outcomes = store.add_secrets(secrets)
            if len(outcomes) != len(secrets) or any(o.value != "new" for o in outcomes):
                raise ClusterError("filling the source store: a generated id was not new")
            store.add_audit(audit)
    finally:
        store.close()


def _audit_document(
    rng: random.Random, audit_key: bytes, secret_id: str, created: dt.datetime
) -> dict[str, Any]:
    """The audit record the create of ``secret_id`` would have left (AUDIT_FIELDS)."""
    return {
        "ts": created + dt.timedelta(microseconds=rng.randrange(1000)),
        "op": "create",
        "status": 200,
        "outcome": outcome_for_status(200),
        "client_ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        "request_id": uuid.UUID(int=rng.getrandbits(128), version=4).hex,
        "secret_id_hmac": secret_id_hmac(audit_key, secret_id),
        "latency_ms": round(rng.uniform(2, 40), 3),
        "user_agent": "secret-manager-cli/1.0",
        **rng.choice(
            (
                {"api_key_name": None, "tenant": None},
                {"api_key_name": "ci", "tenant": "default"},
                {"api_key_name": "deploy", "tenant": "acme"},
            )
        ),
        "record_id": str(ObjectId()),
    }


# ---- running a step ----------------------------------------------------------------------


def child_env(**settings: str) -> dict[str, str]:
    """This environment without any key or store setting, plus ``settings``: export and
    import need no master key, and each step names its own store."""
    prefixes = ("MASTER_KEY", "MONGO", "DATA_DIR", "AUDIT_HMAC_KEY")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(settings)
    return env


def _vault(*args: str) -> list[str]:
    return [sys.executable, "-m", "vault", *args]


# Each step runs under this small spawner, which waits for it and writes its peak RSS and
# wall time to the report file. Read by the harness itself, ``ru_maxrss`` would be wrong:
# Linux carries a parent's high-water mark into a child it forks (or vforks) across the
# exec, so every step would report at least the harness's own size. The spawner is a bare
# interpreter (-I -S, about 8 MiB), far below any step's own peak.
SPAWNER = """
import os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
cpu = usage.ru_utime + usage.ru_stime
with open(report, "w") as out:
    out.write(f"{usage.ru_maxrss} {seconds} {cpu}\\n")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


class Measured:
    """``python -m vault ARGS`` under the spawner, in a session of its own so that the
    step and its spawner can be killed together."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str], workdir: Path, **streams: Any
    ) -> None:
        self._report = workdir / f"rss-{uuid.uuid4().hex}.txt"
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.popen: subprocess.Popen[bytes] = subprocess.Popen(  # noqa: S603 - ours, no shell
            [sys.executable, "-I", "-S", "-c", SPAWNER, str(self._report), *_vault(*args)],
            env=env, stderr=self._stderr, start_new_session=True, **streams,
        )  # fmt: skip

    def kill(self) -> None:
        """Stop the step and its spawner (SIGKILL to the session's group)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def close(self) -> None:
        """Stop the step if it still runs; drop its captured output."""
        self.kill()
        self._stderr.close()

    def finish(self) -> Finished:
        """Wait for the step; its exit status, wall time, peak RSS, CPU and standard error."""
        returncode = self.popen.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        try:
            rss, seconds, cpu = self._report.read_text().split()
        except (OSError, ValueError):
            return Finished(returncode or 1, 0.0, 0, 0.0, stderr)
        return Finished(returncode, float(seconds), int(rss), float(cpu), stderr)


@contextmanager
def _bounded(timeout: float, what: str) -> Iterator[list[Measured]]:
    """A list for the step's processes: killed if the step outlives ``timeout``, and any
    still running when the step ends (an error, Ctrl-C) killed too."""
    steps: list[Measured] = []
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        for step in steps:
            step.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        yield steps
    finally:
        watchdog.cancel()
        for step in steps:
            step.close()
    if expired.is_set():
        raise ClusterError(f"{what} took longer than {timeout:g}s; it was stopped")


def run_step(
    args: Sequence[str], env: dict[str, str], workdir: Path, timeout: float, what: str
) -> Finished:
    """Run ``python -m vault ARGS`` alone, its output discarded; ClusterError if it fails."""
    with _bounded(timeout, what) as steps:
        steps.append(
            Measured(args, env, workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        )
        finished = steps[0].finish()
    _check_exit(finished, what)
    return finished


def run_pipe(
    export_env: dict[str, str],
    import_env: dict[str, str],
    workdir: Path,
    timeout: float,
    what: str,
) -> tuple[Finished, Finished]:
    """``export --audit | import``, each process measured on its own."""
    with _bounded(timeout, what) as steps:
        exporter = Measured(
            ["export", "--audit"], export_env, workdir,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )  # fmt: skip
        steps.append(exporter)
        pipe = exporter.popen.stdout
        if pipe is None:  # never: stdout=PIPE
            raise ClusterError(f"{what}: the export has no standard output to pipe")
        try:
            steps.append(
                Measured(["import"], import_env, workdir, stdin=pipe, stdout=subprocess.DEVNULL)
            )
        finally:
            pipe.close()  # the importer holds the read end now
        exported, imported = exporter.finish(), steps[1].finish()
    _check_exit(exported, f"{what}: export")
    _check_exit(imported, f"{what}: import")
    return exported, imported


def _check_exit(finished: Finished, what: str) -> None:
    if finished.returncode != 0:
        raise ClusterError(
            f"{what} exited with status {finished.returncode}:\n{finished.stderr[-2000:]}"
        )


# ---- checking what each step did ---------------------------------------------------------


def exported_counts(finished: Finished, what: str) -> tuple[int, int]:
    """Secrets and audit records an export's summary line names."""
    match = EXPORT_SUMMARY.search(finished.stderr)
    if match is None:
        raise ClusterError(f"{what}: no export summary line in:\n{finished.stderr[-2000:]}")
    return int(match[1]), int(match[2])


def imported_counts(finished: Finished, what: str) -> tuple[int, int]:
    """New secrets and new audit records an import's summary line names; ClusterError when
    it found anything already there, expired or in conflict (every target is fresh)."""
    match = IMPORT_SUMMARY.search(finished.stderr)
    if match is None:
        raise ClusterError(f"{what}: no import summary line in:\n{finished.stderr[-2000:]}")
    new, present, fewer, expired, conflicts, audit_new, audit_present = map(int, match.groups())
    if present or fewer or expired or conflicts or audit_present:
        raise ClusterError(f"{what}: a fresh store should take every record as new: {match[0]}")
    return new, audit_new


def expect(counts: tuple[int, int], records: int, what: str) -> None:
    """Every secret and one audit record per secret, or ClusterError."""
    if counts != (records, records):
        raise ClusterError(
            f"{what} carried {counts[0]} secrets and {counts[1]} audit records, "
            f"not {records} of each"
        )


def sqlite_counts(data_dir: Path) -> tuple[int, int]:
    """Secrets and audit records a SQLite store holds, read directly."""
    conn = sqlite3.connect(f"file:{data_dir / 'vault.db'}?mode=ro", uri=True)
    try:
        secrets = conn.execute("SELECT COUNT(*) FROM secrets").fetchone()[0]
        audit = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        return int(secrets), int(audit)
    finally:
        conn.close()


def mongo_counts(uri: str, database: str) -> tuple[int, int]:
    """Secrets and audit records a MongoDB database holds, read directly."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=5000
    )
    try:
        db = client[database]
        return int(db["secrets"].count_documents({})), int(db["audit"].count_documents({}))
    finally:
        client.close()


@dataclasses.dataclass(frozen=True)
class Contents:
    """What a file carries, independent of record order: secret lines and audit ids."""

    secrets: int
    secrets_sha256: str
    audit: int
    audit_ids_sha256: str


def contents(path: Path) -> Contents:
    """The secret lines (whole, as written) and audit record ids of an export file."""
    secrets: list[bytes] = []
    audit_ids: list[str] = []
    with path.open("rb") as file:
        for line in file:
            if line.startswith(b'{"type":"secret"'):
                secrets.append(line)
            elif line.startswith(b'{"type":"audit"'):
                audit_ids.append(json.loads(line)["record_id"])
    secrets.sort()
    audit_ids.sort()
    return Contents(
        len(secrets),
        hashlib.sha256(b"".join(secrets)).hexdigest(),
        len(audit_ids),
        hashlib.sha256("\n".join(audit_ids).encode()).hexdigest(),
    )


# ---- one size ----------------------------------------------------------------------------


def bench_size(
    records: int,
    workdir: Path,
    mongo_uri: str | None,
    *,
    pipe_to: str,
    timeout: float,
    db_pid: int | None = None,
) -> list[Step]:
    """Fill a store with ``records`` secrets, run every step on it, check them; the steps.
    ``db_pid``: the nx-27017 server this run started, whose CPU each step is charged."""
    run = workdir / f"n{records}"
    source = run / "source"
    log(f"{records} records: filling the SQLite store")
    started = time.perf_counter()
    fill(source / "vault.db", records)
    log(f"{records} records: filled in {time.perf_counter() - started:.1f}s")
    steps: list[Step] = []

    def db_cpu() -> float | None:
        return None if db_pid is None else cpu_seconds(db_pid)

    def measured(
        name: str, finished: Finished, counts: tuple[int, int], db_before: float | None
    ) -> None:
        expect(counts, records, name)
        db_after = db_cpu()
        db = None if db_before is None or db_after is None else db_after - db_before
        steps.append(
            Step(name, *counts, finished.seconds, finished.peak_rss_kib, finished.cpu_seconds, db)
        )
        log(
            f"{records} records: {name}: {finished.seconds:.1f}s, "
            f"peak RSS {finished.peak_rss_kib / MIB:.1f} MiB, CPU {finished.cpu_seconds:.1f}s"
        )

    from_sqlite = run / "from-sqlite.jsonl"
    name = "export --audit: SQLite → file"
    before = db_cpu()
    done = run_step(
        ["export", "--audit", "--output", str(from_sqlite)],
        child_env(DATA_DIR=str(source)), run, timeout, name,
    )  # fmt: skip
    measured(name, done, exported_counts(done, name), before)

    name = "import: file → SQLite"
    target = run / "sqlite-target"
    before = db_cpu()
    done = run_step(
        ["import", "--input", str(from_sqlite)], child_env(DATA_DIR=str(target)), run, timeout, name
    )
    measured(name, done, imported_counts(done, name), before)
    expect(sqlite_counts(target), records, "the SQLite store imported into")

    if mongo_uri is not None:
        database = "transfer" + uuid.uuid4().hex[:8]
        mongo_env = child_env(MONGO_URI=mongo_uri, MONGO_DB=database)
        name = "import: file → MongoDB"
        before = db_cpu()
        done = run_step(["import", "--input", str(from_sqlite)], mongo_env, run, timeout, name)
        measured(name, done, imported_counts(done, name), before)
        expect(mongo_counts(mongo_uri, database), records, "the MongoDB database imported into")

        from_mongo = run / "from-mongo.jsonl"
        name = "export --audit: MongoDB → file"
        before = db_cpu()
        done = run_step(
            ["export", "--audit", "--output", str(from_mongo)], mongo_env, run, timeout, name
        )
        measured(name, done, exported_counts(done, name), before)
        if contents(from_sqlite) != contents(from_mongo):
            raise ClusterError(
                "the files exported from SQLite and from MongoDB differ: "
                f"{contents(from_sqlite)} against {contents(from_mongo)}"
            )

    if pipe_to == "mongo" and mongo_uri is not None:
        database = "transfer" + uuid.uuid4().hex[:8]
        import_env = child_env(MONGO_URI=mongo_uri, MONGO_DB=database)
        label = "MongoDB"
    else:
        import_env = child_env(DATA_DIR=str(run / "pipe-target"))
        label = "SQLite"
    name = f"pipe SQLite → {label}"
    before = db_cpu()
    exported, imported = run_pipe(child_env(DATA_DIR=str(source)), import_env, run, timeout, name)
    # The database's CPU is the import's: the export reads SQLite.
    measured(f"{name}: export --audit", exported, exported_counts(exported, name), None)
    measured(f"{name}: import", imported, imported_counts(imported, name), before)
    if label == "MongoDB":
        expect(mongo_counts(mongo_uri or "", database), records, "the pipe's MongoDB database")
    else:
        expect(sqlite_counts(run / "pipe-target"), records, "the pipe's SQLite store")
    return steps


def table(steps: list[tuple[int, Step]]) -> str:
    """Markdown: one row per step and size, the sizes of a step together."""
    order = {step.name: index for index, (_, step) in reversed(list(enumerate(steps)))}
    lines = [
        "| step | secrets | audit records | seconds | records/s | peak RSS MiB | CPU s "
        "| DB CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _, step in sorted(steps, key=lambda item: (order[item[1].name], item[0])):
        db_cpu = "-" if step.db_cpu_seconds is None else f"{step.db_cpu_seconds:.1f}"
        lines.append(
            f"| {step.name} | {step.secrets} | {step.audit} | {step.seconds:.1f} "
            f"| {step.rate:.0f} | {step.peak_rss_kib / MIB:.1f} | {step.cpu_seconds:.1f} "
            f"| {db_cpu} |"
        )
    return "\n".join(lines)


def sizes(value: str) -> list[int]:
    """An argparse type: comma-separated record counts, each at least 1."""
    try:
        return [positive_int(part) for part in value.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected counts like 20000,200000, not {value}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=positive_int, default=200_000, help="(200000)")
    parser.add_argument("--sizes", type=sizes, help="several record counts, e.g. 20000,200000")
    parser.add_argument("--mongo-uri", default=os.environ.get("MONGO_URI"))
    parser.add_argument(
        "--mongo-max",
        type=positive_int,
        help="run the MongoDB steps only for sizes up to this (all)",
    )
    parser.add_argument("--pipe-to", choices=("mongo", "sqlite"), default="mongo")
    parser.add_argument("--timeout", type=float, default=STEP_TIMEOUT, help="seconds per step")
    args = parser.parse_args(argv)
    counts = args.sizes or [args.records]
    results: list[tuple[int, Step]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="secret-manager-transfer-") as tmp:
            workdir = Path(tmp)
            wants_mongo = args.mongo_max is None or min(counts) <= args.mongo_max
            with mongodb(args.mongo_uri, workdir) if wants_mongo else _none() as mongo_uri:
                for records in counts:
                    use = args.mongo_max is None or records <= args.mongo_max
                    steps = bench_size(
                        records,
                        workdir,
                        mongo_uri if use else None,
                        pipe_to=args.pipe_to,
                        timeout=args.timeout,
                        db_pid=nx_pid(workdir),
                    )
                    results += [(records, step) for step in steps]
    except ClusterError as exc:
        print(f"transfer: {exc}", file=sys.stderr)
        if results:
            print(table(results))
        return 1
    print(table(results))
    return 0


@contextmanager
def _none() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    raise SystemExit(main())
