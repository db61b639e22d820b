"""CPU per request of the whole app in process, its store included, without an HTTP server.

The app the factory builds (or a naive app of loadtests/baselines.py) on a fresh SQLite data
directory, or on MongoDB with ``--mongo-uri``, driven directly through ASGI: 2,000 secrets
created, then batches of creates or fetches of them from ``--concurrency`` callers at once.
Per batch it counts the process's CPU (the store's threads included), the event loop's
thread's own, and user against system time; each figure is the median over the batches.
What a server adds (Hypercorn, h11, sockets: about 200 µs a request here, the same for
every app) is not in it, so the differences between configurations stand out: ``--set
AUDIT_ENABLED=false`` shows what the audit record costs a fetch, ``--naive`` what the
straightforward implementation does on the same store.

    python -m loadtests.request_cost                                  # fetch, one caller
    python -m loadtests.request_cost --op create --concurrency 20
    python -m loadtests.request_cost --set AUDIT_ENABLED=false
    python -m loadtests.request_cost --naive
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message

from loadtests.baselines import naive_app, naive_sqlite_app
from loadtests.middleware_cost import post_scope
from vault.app import create_app
from vault.crypto import generate_key
from vault.settings import Settings

SECRET = b'{"secret": "c2VjcmV0"}'
SEEDED = 2000  # secrets created before measuring; fetches take them in turn


async def call(app: ASGIApp, path: str, body: bytes) -> tuple[int, bytes]:
    """One request through ``app``: its status and body."""
    received: asyncio.Queue[Message] = asyncio.Queue()
    received.put_nowait({"type": "http.request", "body": body, "more_body": False})
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(post_scope(path, len(body)), received.get, send)
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])


@dataclass(frozen=True)
class Cost:
    """Medians over the batches, in µs per request (switches: per request)."""

    cpu: float
    loop_thread: float
    user: float
    system: float
    wall: float
    voluntary_switches: float

    def row(self, name: str) -> str:
        return (
            f"| {name} | {self.cpu:.0f} | {self.loop_thread:.0f} | {self.user:.0f} |"
            f" {self.system:.0f} | {self.wall:.0f} | {self.voluntary_switches:.1f} |"
        )


HEADER = (
    "| configuration | CPU µs/req | event loop's thread | user | system | wall µs/req |"
    " voluntary switches/req |\n|---|---:|---:|---:|---:|---:|---:|"
)


async def measure(app: ASGIApp, op: str, concurrency: int, requests: int, batches: int) -> Cost:
    """Seed the store, then time ``batches`` batches of ``requests`` requests of ``op``."""
    ids = []
    for _ in range(SEEDED):
        status, body = await call(app, "/vault/secret/create", SECRET)
        if status != 200:
            raise RuntimeError(f"a create answered {status}: {body[:200]!r}")
        ids.append(json.loads(body)["secret_id"])
    bodies = [json.dumps({"secret_id": i}).encode() for i in ids] if op == "fetch" else [SECRET]
    path = f"/vault/secret/{op}"
    turn = 0

    async def caller(count: int) -> None:
        nonlocal turn
        for _ in range(count):
            status, body = await call(app, path, bodies[turn % len(bodies)])
            turn += 1
            if status != 200:
                raise RuntimeError(f"a {op} answered {status}: {body[:200]!r}")

    async def batch() -> None:
        await asyncio.gather(*(caller(requests // concurrency) for _ in range(concurrency)))

    await batch()  # warm up
    done = requests // concurrency * concurrency
    rows: list[tuple[float, ...]] = []
    for _ in range(batches):
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF)
        cpu, loop, wall = time.process_time(), time.thread_time(), time.perf_counter()
        await batch()
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append(
            (
                time.process_time() - cpu,
                time.thread_time() - loop,
                after.ru_utime - before.ru_utime,
                after.ru_stime - before.ru_stime,
                time.perf_counter() - wall,
                after.ru_nvcsw - before.ru_nvcsw,
            )
        )
    cpu, loop, user, system, wall, switches = (
        statistics.median(row[k] for row in rows) / done for k in range(6)
    )
    micro = 1e6
    return Cost(cpu * micro, loop * micro, user * micro, system * micro, wall * micro, switches)


def settings(overrides: Mapping[str, str], mongo_uri: str | None) -> Settings:
    env = {
        "MASTER_KEY": generate_key(),
        "DATA_DIR": tempfile.mkdtemp(prefix="request-cost-"),
        "RATE_LIMIT": "1000000/second",  # the limiter runs but never refuses
        "LOG_LEVEL": "WARNING",
        **({"MONGO_URI": mongo_uri, "MONGO_DB": "request_cost"} if mongo_uri else {}),
        **overrides,
    }
    return Settings.from_env(env)


async def run(
    op: str,
    concurrency: int,
    requests: int,
    batches: int,
    overrides: Mapping[str, str],
    naive: bool = False,
    mongo_uri: str | None = None,
) -> Cost:
    if naive:
        os.environ.update(
            MASTER_KEY=generate_key(), DATA_DIR=tempfile.mkdtemp(prefix="request-cost-")
        )
        if mongo_uri:
            os.environ.update(MONGO_URI=mongo_uri, MONGO_DB="request_cost_naive")
        app = naive_app() if mongo_uri else naive_sqlite_app()
        return await measure(app, op, concurrency, requests, batches)
    service = create_app(settings(overrides, mongo_uri))
    async with service.router.lifespan_context(service):
        return await measure(service, op, concurrency, requests, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--op", choices=("fetch", "create"), default="fetch")
    parser.add_argument("--concurrency", type=int, default=1, help="callers at once (1)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per batch (1000)")
    parser.add_argument("--batches", type=int, default=15, help="batches (15)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a setting (repeatable)"
    )
    parser.add_argument("--naive", action="store_true", help="the naive app of the same store")
    parser.add_argument("--mongo-uri", help="MongoDB instead of a fresh SQLite directory")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    name = "naive" if args.naive else "service " + " ".join(args.set)
    cost = asyncio.run(
        run(
            args.op,
            args.concurrency,
            args.requests,
            args.batches,
            overrides,
            naive=args.naive,
            mongo_uri=args.mongo_uri,
        )
    )
    print(HEADER)
    print(cost.row(f"{name.strip()}, {args.op}, {args.concurrency} at once"))


if __name__ == "__main__":
    main()
