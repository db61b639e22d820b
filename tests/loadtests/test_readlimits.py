"""The read-limit check's verdict: it must catch a server that serves a secret past its limit.

Against stand-in servers, so the check itself is tested apart from the service: one keeps
read limits exactly (a lock), one races (reads the count, pauses, writes it back), one
forgets to delete. The check against the real replicas runs in test_cluster.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from loadtests.readlimits import Fetch, check_read_limits, peak_in_flight, summarize
from tests.loadtests.conftest import JSONHandler, stand_in_server

MAX_READS = [1, 3]


class ReadLimitedVault(JSONHandler):
    """Creates and fetches with read limits; ``racy`` checks and takes a read apart."""

    racy: ClassVar[bool] = False
    reads: ClassVar[dict[str, tuple[str, int]]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()
    protocol_version = "HTTP/1.1"  # keep-alive, as the service

    def do_GET(self) -> None:
        self.answer(200, {"status": "ok"})

    def do_POST(self) -> None:
        body = self.json_body()
        if self.path.startswith("/vault/secret/create"):
            secret_id = str(uuid.uuid4())
            self.reads[secret_id] = (body["secret"], body["max_reads"])
            self.answer(200, {"secret_id": secret_id, "reads_left": body["max_reads"]})
            return
        secret_id = body["secret_id"]
        if self.racy:
            secret, left = self.reads.get(secret_id, ("", 0))
            time.sleep(0.02)  # another fetch reads the same count meanwhile
            self.reads[secret_id] = (secret, left - 1)
        else:
            with self.lock:
                secret, left = self.reads.get(secret_id, ("", 0))
                self.reads[secret_id] = (secret, left - 1)
        if left < 1:
            self.answer(404, {"detail": "no secret has this secret_id"})
        else:
            self.answer(200, {"secret": secret, "reads_left": left - 1})


def serve(racy: bool) -> Iterator[str]:
    handler = type("Handler", (ReadLimitedVault,), {"racy": racy, "reads": {}})
    with stand_in_server(handler) as url:
        yield url


@pytest.fixture
def exact_server() -> Iterator[str]:
    yield from serve(racy=False)


@pytest.fixture
def racy_server() -> Iterator[str]:
    yield from serve(racy=True)


def judged(url: str, stored_after: int = 0) -> Any:
    results, seconds = check_read_limits(url, 4, 8, 2, MAX_READS)
    return summarize(
        results,
        replicas=1,
        fetches=8,
        at_once=2,
        max_reads=MAX_READS,
        run_dir="run",
        balancer_config="run/haproxy.cfg",
        stored_after=stored_after,
        seconds=seconds,
        replica_exits={"r1": None},
    )


def test_an_exact_server_passes_and_every_burst_raced(exact_server: str) -> None:
    summary = judged(exact_server)

    assert summary.problems == []
    assert [(r.max_reads, r.served, r.gone) for r in summary.results] == [
        (1, 1, 7), (3, 3, 5), (1, 1, 7), (3, 3, 5)
    ]  # fmt: skip
    assert [r.reads_left for r in summary.results] == [[0], [0, 1, 2], [0], [0, 1, 2]]
    assert summary.reads_served == summary.reads_allowed == 8
    # The fetches of one secret really were in flight together, past its read limit.
    assert summary.min_peak_in_flight > max(MAX_READS)


def test_a_server_that_serves_past_the_limit_fails_the_check(racy_server: str) -> None:
    summary = judged(racy_server)

    assert summary.reads_served > summary.reads_allowed
    assert any(p.endswith("times: over its limit") for p in summary.problems), summary.problems


def test_a_used_up_secret_left_in_the_database_fails_the_check(exact_server: str) -> None:
    summary = judged(exact_server, stored_after=1)

    assert summary.problems == [
        "1 secrets left in the database, not 0: a used-up secret was not deleted"
    ]


def test_overlap_is_counted_from_the_moments_on_the_wire() -> None:
    def fetch(sent: float, answered: float) -> Fetch:
        return Fetch(status=200, sent=sent, answered=answered)

    assert peak_in_flight([fetch(0, 1), fetch(1, 2), fetch(2, 3)]) == 1  # touching only
    assert peak_in_flight([fetch(0, 3), fetch(1, 2), fetch(1.5, 4), fetch(3.5, 5)]) == 3
    assert peak_in_flight([Fetch(status=0)]) == 0  # no answer: no moment to count
