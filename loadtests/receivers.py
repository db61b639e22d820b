"""The benchmark's webhook receivers, on 127.0.0.1, served by a thread of the bench's own.

- ``Receiver(hang=False)`` answers every POST ``200`` at once and notes, for each delivery,
  its ``webhook-id``, its body and when it answered; ``take`` turns what arrived since the
  last call into ``Delivery`` records: the event's type and the time from its ``timestamp``
  (the change it reports, to the millisecond) to that answer. It verifies no signature and
  parses no JSON while answering (the body is read later, by ``take``): a receiver that
  costs little on a machine the server under load shares.
- ``Receiver(hang=True)`` accepts every connection, reads what it is sent and never
  answers, until the sender gives up (``WEBHOOK_TIMEOUT_SECONDS``) or the receiver stops;
  it counts the connections it accepted.

Both speak just enough HTTP/1.1 for the service's deliverer (``http.client``: requests one
after the other on a connection kept alive, each with a ``Content-Length`` body). ``stop``
closes every connection and ends the thread within a bounded wait.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"  # the connection kept alive
START_SECONDS = 10.0  # the receiver's thread is listening within this, or the bench stops
STOP_SECONDS = 5.0  # and has closed everything within this


@dataclass(frozen=True)
class Delivery:
    """One delivery the healthy receiver answered 200."""

    webhook_id: str
    type: str  # the event's, from its body
    latency_ms: float  # from the event's timestamp (the change) to the receiver's answer


@dataclass
class Deliveries:
    """What the healthy receiver got in one or more cells, and what the outbox still held."""

    latencies_ms: list[float] = field(default_factory=list)
    types: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0  # deliveries of a webhook-id already seen (in the same cell)
    undelivered: int = 0  # events left in the outbox when the server stopped

    @classmethod
    def of(cls, received: Iterable[Delivery], undelivered: int) -> Deliveries:
        """One cell's deliveries (webhook-ids are unique across cells: each is random)."""
        run = cls(undelivered=undelivered)
        seen: set[str] = set()
        for delivery in received:
            run.latencies_ms.append(delivery.latency_ms)
            run.types[delivery.type] += 1
            run.duplicates += delivery.webhook_id in seen
            seen.add(delivery.webhook_id)
        return run

    def add(self, other: Deliveries) -> None:
        self.latencies_ms += other.latencies_ms
        self.types += other.types
        self.duplicates += other.duplicates
        self.undelivered += other.undelivered

    @property
    def count(self) -> int:
        return len(self.latencies_ms)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def parse_delivery(webhook_id: str, body: bytes, answered: float) -> Delivery:
    """A delivery from its body (``{"type", "timestamp": "...Z", "data"}``) and the Unix
    time the receiver answered it. The timestamp is cut to the millisecond, so the latency
    reads up to 1 ms long."""
    event = json.loads(body)
    at = dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
    return Delivery(webhook_id, str(event["type"]), (answered - at.timestamp()) * 1000)


def header_fields(head: bytes) -> dict[bytes, bytes]:
    """A request head's header fields, names lowercased (its first line left out)."""
    fields: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name:
            fields[name.strip().lower()] = value.strip()
    return fields


class Receiver:
    """A webhook receiver on 127.0.0.1 (see the module docstring); ``start`` it, give the
    service its ``url``, ``stop`` it."""

    def __init__(self, *, hang: bool) -> None:
        self.hang = hang
        self.url = ""
        self.accepted = 0  # connections accepted, answered or not
        self._lock = threading.Lock()
        self._received: list[tuple[str, bytes, float]] = []  # webhook-id, body, answered at
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(),), name="bench-receiver", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(START_SECONDS) or self._failed is not None:
            raise RuntimeError(f"the webhook receiver did not start: {self._failed!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(STOP_SECONDS)

    def take(self) -> list[Delivery]:
        """The deliveries answered since the last call, oldest first."""
        with self._lock:
            received, self._received = self._received, []
        return [parse_delivery(*item) for item in received]

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None  # noqa: S101 - a handler runs in a task
            connections[task] = writer
            self.accepted += 1
            try:
                await (self._hold(reader) if self.hang else self._answer(reader, writer))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                pass  # the sender gave up or sent what the service never sends
            finally:
                writer.close()
                connections.pop(task, None)

        try:
            server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        except OSError as exc:
            self._failed = exc
            self._ready.set()
            return
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hooks"
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            # Each handler then reads the end of its stream and returns (a cancelled one
            # would make asyncio's stream callback log its cancellation as an error).
            for writer in list(connections.values()):
                writer.transport.abort()
            if connections:
                await asyncio.wait(set(connections), timeout=STOP_SECONDS)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # requests one after the other on the connection, until the sender closes
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            fields = header_fields(head)
            body = await reader.readexactly(int(fields.get(b"content-length", b"0")))
            answered = time.time()
            with self._lock:  # noted before the sender can see the answer
                self._received.append((fields.get(b"webhook-id", b"").decode(), body, answered))
            writer.write(OK)
            await writer.drain()

    @staticmethod
    async def _hold(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):  # until the sender gives up and closes
            pass


@contextmanager
def receiver(*, hang: bool) -> Iterator[Receiver]:
    """A started receiver, stopped on the way out."""
    started = Receiver(hang=hang)
    started.start()
    try:
        yield started
    finally:
        started.stop()
