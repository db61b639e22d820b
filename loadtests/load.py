"""The load: Locust run headless through the balancer, with a replica killed on the way if asked."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loadtests.haproxy import Balancer
from loadtests.processes import ClusterError, Process, log, wait_for
from loadtests.replicas import Replica

# Locust needs a moment to import and spawn; past its run time this much more is a hang.
LOCUST_GRACE_SECONDS = 60.0


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


def locust_command(args: argparse.Namespace, host: str, run_dir: Path) -> list[str]:
    """Locust headless against ``host``, its CSV and JSON statistics written to ``run_dir``."""
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
