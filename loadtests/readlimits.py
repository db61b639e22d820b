"""The read-limit check: read-limited secrets fetched concurrently through the balancer.

Creates secrets with ``max_reads`` k, then fetches each N times at once through HAProxy,
across replicas that share one MongoDB. Each burst starts behind a barrier on connections
opened beforehand, and the moments each fetch was written to its connection and answered
are traced, so the report shows how many fetches of one secret really were in flight
together. A read limit is exact when every secret was served (200 with its bytes) exactly
min(N, k) times, each answer with another ``reads_left`` (k-1 down to k-min(N, k)), and
every other fetch got 404; a secret whose reads are used up is gone from the database.

Secret ids never leave this module: a secret is named by its number in the run.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx

from loadtests.processes import ClusterError

CREATE_PATH = "/vault/secret/create"
FETCH_PATH = "/vault/secret/fetch"
# Set by the edge (haproxy.cfg) on every answer a replica gave: its server name there.
SERVED_BY = "X-Served-By"


@dataclass
class Fetch:
    """One fetch of a burst: what came back, from which replica, and when (monotonic s)."""

    status: int  # 0 when no HTTP answer came
    secret: bytes | None = None  # the bytes of a 200's "secret"
    reads_left: object = None  # the 200's "reads_left" as answered
    replica: str | None = None
    sent: float | None = None  # the request fully written to its connection
    answered: float | None = None  # the response's headers read


@dataclass
class SecretResult:
    """How one secret's burst went; ``number`` names it (its id is a bearer capability)."""

    number: int
    max_reads: int
    fetches: int
    served: int  # 200 with the secret's own bytes
    gone: int  # 404: its reads were used up
    wrong: int  # 200 without the secret's bytes
    errors: int  # no answer, or any status but 200 and 404
    reads_left: list[Any]  # the "reads_left" of the 200s, sorted when they are all integers
    replicas: dict[str, int]  # answers by replica
    served_by: dict[str, int]  # reads served by replica
    peak_in_flight: int  # most fetches of this secret written and not yet answered at once

    @property
    def allowed(self) -> int:
        """The reads this burst must be served: min(N, k)."""
        return min(self.fetches, self.max_reads)


@dataclass
class ReadLimitSummary:
    """What a read-limit check proved; ``problems`` lists why it failed, if it did."""

    replicas: int
    secrets: int
    fetches_per_secret: int
    secrets_at_once: int
    max_reads: list[int]
    run_dir: str
    balancer_config: str
    results: list[SecretResult]
    reads_allowed: int  # the sum of min(N, k)
    reads_served: int
    not_found: int
    errors: int
    by_replica: dict[str, int]  # answers, 200 or not
    served_by_replica: dict[str, int]
    min_peak_in_flight: int
    stored_after: int | None  # secrets left in the database
    expected_stored_after: int  # the secrets whose reads were not all used
    seconds: float
    replica_exits: dict[str, int | None]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Created:
    number: int
    secret_id: str
    plaintext: bytes
    max_reads: int


def _trace_into(fetch: Fetch) -> Any:
    """An httpx trace hook noting when ``fetch`` went out on its connection and came back."""

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event == "http11.send_request_body.complete":
            fetch.sent = time.monotonic()
        elif event == "http11.receive_response_headers.complete":
            fetch.answered = time.monotonic()

    return trace


async def _create(client: httpx.AsyncClient, number: int, max_reads: int) -> Created:
    plaintext = os.urandom(32)
    body = {"secret": base64.b64encode(plaintext).decode(), "max_reads": max_reads}
    try:
        response = await client.post(CREATE_PATH, json=body)
    except httpx.HTTPError as exc:
        raise ClusterError(f"creating secret #{number} failed: {exc!r}") from None
    answer = response.json() if response.status_code == 200 else {}
    if response.status_code != 200 or answer.get("reads_left") != max_reads:
        raise ClusterError(
            f"creating secret #{number} with max_reads {max_reads} got HTTP "
            f"{response.status_code} without reads_left {max_reads}: {response.text[:200]}"
        )
    return Created(number, str(answer["secret_id"]), plaintext, max_reads)


async def _fetch(client: httpx.AsyncClient, barrier: asyncio.Barrier, secret_id: str) -> Fetch:
    fetch = Fetch(status=0)
    await barrier.wait()
    try:
        response = await client.post(
            FETCH_PATH, json={"secret_id": secret_id}, extensions={"trace": _trace_into(fetch)}
        )
    except httpx.HTTPError:
        return fetch
    fetch.status = response.status_code
    fetch.replica = response.headers.get(SERVED_BY)
    if response.status_code == 200:
        try:
            answer = response.json()
            fetch.secret = base64.b64decode(answer["secret"], validate=True)
            fetch.reads_left = answer.get("reads_left")
        except (ValueError, KeyError, TypeError):
            fetch.secret = None  # an answer, but not a secret
    return fetch


def peak_in_flight(fetches: Sequence[Fetch]) -> int:
    """The most fetches written to their connections and not yet answered at one moment."""
    edges = sorted(
        [(f.sent, 1) for f in fetches if f.sent is not None and f.answered is not None]
        + [(f.answered, -1) for f in fetches if f.sent is not None and f.answered is not None]
    )  # at a tie an answer (-1) sorts first: touching is not overlapping
    peak = running = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def tally(created: Created, fetches: Sequence[Fetch]) -> SecretResult:
    """One secret's burst counted: served, 404s, wrong answers, errors, replicas, overlap."""
    served = [f for f in fetches if f.status == 200 and f.secret == created.plaintext]
    reads_left: list[Any] = [f.reads_left for f in served]
    if all(type(value) is int for value in reads_left):
        reads_left.sort()
    return SecretResult(
        number=created.number,
        max_reads=created.max_reads,
        fetches=len(fetches),
        served=len(served),
        gone=sum(f.status == 404 for f in fetches),
        wrong=sum(f.status == 200 for f in fetches) - len(served),
        errors=sum(f.status not in (200, 404) for f in fetches),
        reads_left=reads_left,
        replicas=dict(sorted(Counter(f.replica or "?" for f in fetches if f.status).items())),
        served_by=dict(sorted(Counter(f.replica or "?" for f in served).items())),
        peak_in_flight=peak_in_flight(fetches),
    )


async def _check(
    url: str,
    secrets: int,
    fetches: int,
    at_once: int,
    max_reads: Sequence[int],
    tls: ssl.SSLContext | bool,
) -> list[SecretResult]:
    # One connection per fetch in flight, opened before the first burst.
    connections = fetches * at_once
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, verify=tls) as client:
        await asyncio.gather(*(client.get("/healthz") for _ in range(connections)))
        results: list[SecretResult] = []
        for first in range(0, secrets, at_once):
            wave = await asyncio.gather(
                *(
                    _create(client, n + 1, max_reads[n % len(max_reads)])
                    for n in range(first, min(first + at_once, secrets))
                )
            )
            barrier = asyncio.Barrier(fetches * len(wave))
            bursts = [
                [asyncio.create_task(_fetch(client, barrier, c.secret_id)) for _ in range(fetches)]
                for c in wave
            ]
            for created, tasks in zip(wave, bursts, strict=True):
                results.append(tally(created, await asyncio.gather(*tasks)))
        return results


def check_read_limits(
    url: str,
    secrets: int,
    fetches: int,
    at_once: int,
    max_reads: Sequence[int],
    tls: ssl.SSLContext | bool = True,
    names: Mapping[str, str] | None = None,
) -> tuple[list[SecretResult], float]:
    """Create ``secrets`` read-limited secrets (``max_reads`` in turn) and fetch each
    ``fetches`` times at once, ``at_once`` secrets together; the results and the seconds.

    ``names`` renames the balancer's server names in X-Served-By (``replica1``) to the
    harness's replica names (``r1``)."""
    started = time.monotonic()
    results = asyncio.run(_check(url, secrets, fetches, at_once, max_reads, tls))
    for r in results:
        r.replicas = _renamed(r.replicas, names or {})
        r.served_by = _renamed(r.served_by, names or {})
    return results, round(time.monotonic() - started, 2)


def _renamed(counts: dict[str, int], names: Mapping[str, str]) -> dict[str, int]:
    renamed: Counter[str] = Counter()
    for name, count in counts.items():
        renamed[names.get(name, name)] += count
    return dict(sorted(renamed.items()))


def judge(summary: ReadLimitSummary) -> None:
    """Add to ``summary.problems`` every way the reads served missed the reads allowed."""
    problems = summary.problems
    for r in summary.results:
        name = f"secret #{r.number} (max_reads {r.max_reads})"
        if r.served > r.max_reads:
            problems.append(f"{name} was served {r.served} times: over its limit")
        elif r.served < r.allowed:
            problems.append(f"{name} was served {r.served} times of {r.allowed} allowed")
        expected = list(range(r.max_reads - r.served, r.max_reads))
        if r.served <= r.max_reads and r.reads_left != expected:
            problems.append(f"{name} answered reads_left {r.reads_left}, not {expected}")
        if r.wrong:
            problems.append(f"{name}: {r.wrong} answers 200 without the secret's bytes")
        if r.errors:
            problems.append(f"{name}: {r.errors} fetches got neither 200 nor 404")
        if r.peak_in_flight <= r.max_reads < r.fetches:
            problems.append(
                f"{name}: at most {r.peak_in_flight} of its fetches were in flight at once: "
                "the burst did not race its read limit"
            )
    if summary.stored_after is None:
        problems.append("could not count the secrets left in the database")
    elif summary.stored_after != summary.expected_stored_after:
        problems.append(
            f"{summary.stored_after} secrets left in the database, "
            f"not {summary.expected_stored_after}: a used-up secret was not deleted"
        )
    answering = [name for name, count in summary.by_replica.items() if name != "?" and count]
    if summary.replicas > 1 and len(answering) < 2:
        problems.append(f"only {answering or 'no replica'} answered: nothing ran across replicas")
    for name, code in summary.replica_exits.items():
        if code is not None:
            problems.append(f"replica {name} exited on its own with status {code}")


def summarize(
    results: list[SecretResult],
    *,
    replicas: int,
    fetches: int,
    at_once: int,
    max_reads: list[int],
    run_dir: str,
    balancer_config: str,
    stored_after: int | None,
    seconds: float,
    replica_exits: dict[str, int | None],
) -> ReadLimitSummary:
    """The results added up, and judged."""
    by_replica: Counter[str] = Counter()
    served_by: Counter[str] = Counter()
    for r in results:
        by_replica.update(r.replicas)
        served_by.update(r.served_by)
    summary = ReadLimitSummary(
        replicas=replicas,
        secrets=len(results),
        fetches_per_secret=fetches,
        secrets_at_once=at_once,
        max_reads=max_reads,
        run_dir=run_dir,
        balancer_config=balancer_config,
        results=results,
        reads_allowed=sum(r.allowed for r in results),
        reads_served=sum(r.served for r in results),
        not_found=sum(r.gone for r in results),
        errors=sum(r.errors for r in results),
        by_replica=dict(sorted(by_replica.items())),
        served_by_replica=dict(sorted(served_by.items())),
        min_peak_in_flight=min((r.peak_in_flight for r in results), default=0),
        stored_after=stored_after,
        expected_stored_after=sum(r.fetches < r.max_reads for r in results),
        seconds=seconds,
        replica_exits=replica_exits,
    )
    judge(summary)
    return summary


def report(summary: ReadLimitSummary) -> str:
    """The summary as lines for a person: per secret, per max_reads, in total; OK or FAILED."""
    limits = ", ".join(map(str, summary.max_reads))
    lines = [
        f"read-limit check: {summary.replicas} replicas behind HAProxy, {summary.secrets} "
        f"secrets (max_reads {limits} in turn), {summary.fetches_per_secret} concurrent "
        f"fetches of each, {summary.secrets_at_once} secrets at once, {summary.seconds}s",
    ]
    for r in summary.results:
        served_by = ", ".join(f"{name} {count}" for name, count in r.served_by.items())
        lines.append(
            f"  secret #{r.number}: max_reads {r.max_reads}, served {r.served} of {r.allowed} "
            f"allowed ({served_by or 'none'}), {r.gone} x 404, {r.errors} errors; "
            f"{r.peak_in_flight} of {r.fetches} in flight at once"
        )
    for k in sorted(set(summary.max_reads)):
        group = [r for r in summary.results if r.max_reads == k]
        if group:
            lines.append(
                f"max_reads {k}: {len(group)} secrets, reads served "
                f"{sum(r.served for r in group)} of {sum(r.allowed for r in group)} allowed"
            )
    lines.append(
        f"total: reads served {summary.reads_served} of {summary.reads_allowed} allowed; "
        f"{summary.not_found} fetches answered 404, {summary.errors} errors"
    )
    lines.append(
        "answers by replica: "
        + ", ".join(f"{name} {count}" for name, count in summary.by_replica.items())
        + "; reads served by replica: "
        + ", ".join(f"{name} {count}" for name, count in summary.served_by_replica.items())
    )
    lines.append(
        f"fetches of one secret in flight at once: at least {summary.min_peak_in_flight} "
        f"of {summary.fetches_per_secret}"
    )
    stored = "-" if summary.stored_after is None else summary.stored_after
    lines.append(
        f"secrets left in the database: {stored} ({summary.expected_stored_after} expected)"
    )
    lines.append(f"run directory: {summary.run_dir}")
    lines.extend(f"FAIL: {problem}" for problem in summary.problems)
    lines.append(
        "OK: no secret was served more, or less, than its read limit allows"
        if summary.ok
        else "FAILED"
    )
    return "\n".join(lines)
