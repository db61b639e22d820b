"""The MongoDB a harness runs against: the one given, or an nx-27017 server of the run.

nx-27017 is a MongoDB wire-protocol server over SQLite (no ``mongod`` installs on these
machines); ``--mongo-uri`` switches to a real one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pymongo.errors

from loadtests.processes import Process, executable, free_port, log, wait_for


def mongo_answers(uri: str) -> bool:
    """Whether the MongoDB at ``uri`` answers ``ping`` within half a second."""
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


def nx_pid(run_dir: Path) -> int | None:
    """The pid of the nx-27017 server ``mongodb(None, run_dir)`` started (from its pid file),
    or None when the run uses a given MongoDB: whose CPU a harness charges to the database."""
    pid_file = run_dir / "nx" / "nx.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


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
