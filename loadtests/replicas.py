"""The replicas: real ``secret-manager serve`` processes sharing one master key and database."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtests.processes import Process, answers_200, free_port, log, wait_for
from vault.crypto import generate_key


@dataclass
class Replica:
    """One started replica: its name (``r1``...), loopback address, port and process."""

    name: str
    host: str
    port: int
    process: Process

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def replica_host(index: int) -> str:
    """Replica ``index``'s own loopback address (r1 127.0.0.11, r2 127.0.0.12, ...): the edge
    finds them all under one DNS name and one port, as it finds Swarm's tasks."""
    return f"127.0.0.{10 + index}"


def replica_env(
    mongo_uri: str, mongo_db: str, master_key: str, data_dir: Path, rate_limit: str = "off"
) -> dict[str, str]:
    """This process's environment with the settings the harness owns replaced.

    ``rate_limit`` other than ``off`` is the replicas' ``RATE_LIMIT``, on counters shared
    through the run's database (``RATE_LIMIT_STORAGE``), the stack's default.

    Other settings (``AUDIT_MODE``, ``MONGO_WRITE_CONCERN``, ...) pass through, so a run can
    try them; ``*_FILE`` variants of the replaced ones are dropped, as both forms conflict.
    """
    owned = ("MASTER_KEY", "MONGO_URI", "AUDIT_HMAC_KEY")
    exact = {
        *("MONGO_DB", "RATE_LIMIT", "RATE_LIMIT_STORAGE", "LOG_LEVEL", "DATA_DIR"),
        "TRUSTED_PROXIES",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(owned) and k not in exact}
    env.update(
        MASTER_KEY=master_key,
        MONGO_URI=mongo_uri,
        MONGO_DB=mongo_db,
        # All Locust's load comes from one address; a per-IP limit would refuse most of it.
        RATE_LIMIT=rate_limit,
        # The edge connects from 127.0.0.1 (the replicas are on 127.0.0.11 and up): only its
        # X-Forwarded-For is believed, so the audit log records the client, as in Swarm.
        TRUSTED_PROXIES="127.0.0.1/32",
        LOG_LEVEL="WARNING",
        DATA_DIR=str(data_dir),
    )
    if rate_limit != "off":
        env["RATE_LIMIT_STORAGE"] = mongo_uri
    return env


@contextlib.contextmanager
def replicas(
    count: int, mongo_uri: str, mongo_db: str, run_dir: Path, rate_limit: str = "off"
) -> Iterator[list[Replica]]:
    """``count`` real ``secret-manager serve`` processes on one key and one database."""
    master_key = generate_key()
    started: list[Replica] = []
    port = free_port()  # one port on every replica's address, as in Swarm
    try:
        for index in range(1, count + 1):
            name, host = f"r{index}", replica_host(index)
            data_dir = run_dir / f"{name}-data"
            env = replica_env(mongo_uri, mongo_db, master_key, data_dir, rate_limit)
            command = [sys.executable, "-m", "vault", "serve", "--host", host, "--port", str(port)]
            process = Process(name, command, run_dir / f"{name}.log", env)
            started.append(Replica(name, host, port, process))
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
