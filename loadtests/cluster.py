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

With ``--read-limit-check`` it runs no Locust: it creates read-limited secrets through the
balancer and fetches each of them many times at once, then reports the reads served against
the reads allowed, per secret and in total (``loadtests/readlimits.py``)::

    python -m loadtests.cluster --read-limit-check --replicas 3
    python -m loadtests.cluster --read-limit-check --secrets 60 --fetches 40 --max-reads 1 5 30

The killed replica is ``r1``, S seconds after the first request reaches the balancer.
Locust's own exit status (non-zero on any failed request) is reported, not obeyed: requests
cut off by the kill are expected to fail; ``--max-failures`` sets a limit on them, and
``--max-p95-ms`` one on the p95 of all requests (a ``--max-p95-ms`` passed to Locust
through ``--locust-args`` only shows in Locust's exit status). Replicas
run with ``RATE_LIMIT=off``, ``LOG_LEVEL=WARNING`` and ``TRUSTED_PROXIES`` the edge's
address; other settings in the environment (``AUDIT_MODE``, ``MONGO_WRITE_CONCERN``, ...)
pass through to them.

HAProxy runs the shipped haproxy.cfg (the Swarm edge) with only its addresses and ports
substituted, and its per-address connection limits raised (every client here is 127.0.0.1):
TLS with a throwaway certificate, the replicas found through a DNS server of the run on
their own loopback addresses (127.0.0.11, ...). It needs HAProxy (Debian:
``apt-get install haproxy``), openssl and the ``loadtest`` extra
(``pip install -e '.[loadtest]'``). Everything listens on loopback. The run directory
(``--run-dir``, else a new temporary one; printed at the end) keeps every process's log, the
HAProxy configuration, Locust's CSV files and the acknowledged ids. HAProxy's live statistics
page is at the ``stats`` URL printed at start-up.

Exit status: 0 when every acknowledged secret came back intact (and failures stayed within
``--max-failures``), or with ``--read-limit-check`` when every secret was served exactly
min(fetches, max_reads) times; 1 when not; 2 when the cluster could not be set up or run;
130 on Ctrl-C.
Every process it started is stopped on the way out, whatever happened.

This module is the command line and the order of things; each part lives beside it:
``processes`` (child processes, ports, programs), ``mongo`` (the database), ``replicas``,
``haproxy`` (the edge and its substitutions), ``dns``, ``load`` (Locust and the kill),
``report`` (reading the results, the verdict, the printed summary) and ``readlimits`` (the
read-limit check's concurrent fetches, verdict and summary).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from loadtests import readlimits
from loadtests.haproxy import Balancer, balancer
from loadtests.load import run_load
from loadtests.mongo import count_secrets, mongodb
from loadtests.processes import ClusterError, executable, log, positive_int
from loadtests.replicas import Replica, replicas
from loadtests.report import (
    Summary,
    counts_at,
    judge,
    read_acks,
    read_locust_stats,
    report,
    verify,
)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


@contextlib.contextmanager
def cluster(
    args: argparse.Namespace, run_dir: Path
) -> Iterator[tuple[str, str, list[Replica], Balancer]]:
    """The database, the replicas on it and HAProxy in front, stopped in reverse on the way
    out: the MongoDB URI, the run's database name, the replicas and the balancer."""
    haproxy = args.haproxy or executable("haproxy", "/usr/sbin/haproxy")
    if not (os.path.isfile(haproxy) and os.access(haproxy, os.X_OK)):
        raise ClusterError(f"--haproxy {haproxy} is not an executable file")
    with contextlib.ExitStack() as stack:
        mongo_uri = stack.enter_context(mongodb(args.mongo_uri, run_dir))
        mongo_db = "cluster_" + uuid.uuid4().hex[:12]
        backends = stack.enter_context(
            replicas(args.replicas, mongo_uri, mongo_db, run_dir, args.rate_limit)
        )
        lb = stack.enter_context(balancer(haproxy, backends, run_dir))
        yield mongo_uri, mongo_db, backends, lb


def run(args: argparse.Namespace, run_dir: Path) -> Summary:
    """Set up the cluster, load it, kill a replica if asked, tear down, verify, summarise."""
    if not Path(args.locustfile).exists():
        raise ClusterError(f"no locustfile at {args.locustfile}")
    with cluster(args, run_dir) as (mongo_uri, mongo_db, backends, lb):
        locust_code, kill = run_load(args, lb, backends, run_dir)
        requests, failures, kinds, p95 = read_locust_stats(run_dir)
        acks, malformed = read_acks(run_dir / "acked.txt")
        log(f"verifying {len(acks)} acknowledged secrets through the balancer")
        lost, unverified = verify(lb.url, acks, lb.tls)
        exits = {r.name: r.process.popen.poll() for r in backends}
        stored = count_secrets(mongo_uri, mongo_db)
    at_kill = counts_at(run_dir, kill.unix_time) if kill is not None else None
    summary = Summary(
        replicas=args.replicas,
        users=args.users,
        duration_seconds=args.duration,
        scenario=list(args.scenario),
        run_dir=str(run_dir),
        balancer_config=str(lb.config_path),
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


def run_read_limits(args: argparse.Namespace, run_dir: Path) -> readlimits.ReadLimitSummary:
    """Set up the cluster, race fetches of read-limited secrets through it, summarise."""
    with cluster(args, run_dir) as (mongo_uri, mongo_db, backends, lb):
        log(
            f"read-limit check: {args.secrets} secrets, {args.fetches} concurrent fetches "
            f"of each, {args.secrets_at_once} secrets at once"
        )
        results, seconds = readlimits.check_read_limits(
            lb.url,
            args.secrets,
            args.fetches,
            args.secrets_at_once,
            args.max_reads,
            lb.tls,
            lb.server_names(),
        )
        exits = {r.name: r.process.popen.poll() for r in backends}
        stored = count_secrets(mongo_uri, mongo_db)
    return readlimits.summarize(
        results,
        replicas=args.replicas,
        fetches=args.fetches,
        at_once=args.secrets_at_once,
        max_reads=list(args.max_reads),
        run_dir=str(run_dir),
        balancer_config=str(lb.config_path),
        stored_after=stored,
        seconds=seconds,
        replica_exits=exits,
    )


def max_reads(value: str) -> int:
    """An argparse type for --max-reads: what the API accepts, 1 to 1,000,000."""
    number = positive_int(value)
    if number > 1_000_000:
        raise argparse.ArgumentTypeError(f"must be at most 1000000, not {value}")
    return number


def parser() -> argparse.ArgumentParser:
    """The harness's command line; every option has a default that runs without setup."""
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
    p.add_argument(
        "--rate-limit",
        default="off",
        metavar="SPEC",
        help="the replicas' RATE_LIMIT (e.g. 30/hour), on counters shared through the "
        "database (off: Locust's load comes from one address)",
    )
    p.add_argument("--run-dir", type=Path, help="where logs and results go (a new temp dir)")
    p.add_argument("--locustfile", type=Path, default=LOCUSTFILE, help="(loadtests/locustfile.py)")
    p.add_argument("--locust-args", default="", help="more Locust options, one shell-quoted string")
    p.add_argument("--haproxy", help="path of the haproxy binary (found on PATH)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    check = p.add_argument_group(
        "read-limit check",
        "--read-limit-check runs no Locust: it fetches read-limited secrets concurrently "
        "through the balancer and fails when one is served more (or less) than it allows",
    )
    check.add_argument(
        "--read-limit-check", action="store_true", help="run the read-limit check instead"
    )
    check.add_argument(
        "--secrets", type=positive_int, default=30, help="read-limited secrets to create (30)"
    )
    check.add_argument(
        "--fetches", type=positive_int, default=20, help="concurrent fetches of each (20)"
    )
    check.add_argument(
        "--max-reads",
        type=max_reads,
        nargs="+",
        default=[1, 3, 10],
        metavar="K",
        help="the secrets' max_reads, in turn (1 3 10)",
    )
    check.add_argument(
        "--secrets-at-once",
        type=positive_int,
        default=3,
        metavar="S",
        help="secrets whose fetches start together (3)",
    )
    return p


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so every child is stopped on the way out.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the harness: 0 nothing acknowledged was lost, 1 something was, 2 set-up failed."""
    args = parser().parse_args(argv)
    if args.read_limit_check and args.kill_replica_after is not None:
        # A killed replica may use a read and never answer: exactness is for a healthy cluster.
        parser().error("--read-limit-check runs no load to kill a replica in")
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
    summary: Summary | readlimits.ReadLimitSummary
    try:
        summary = run_read_limits(args, run_dir) if args.read_limit_check else run(args, run_dir)
    except ClusterError as exc:
        log(f"error: {exc}")
        log(f"logs are in {run_dir}")
        return 2
    except KeyboardInterrupt:
        log(f"interrupted; everything is stopped; logs are in {run_dir}")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    text = (
        readlimits.report(summary)
        if isinstance(summary, readlimits.ReadLimitSummary)
        else (report(summary))
    )
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps({**asdict(summary), "ok": summary.ok}, indent=2))
    else:
        print(text)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
