"""Webhooks: the lifecycle events in the store's outbox, delivered to the operator's receivers.

Each serving process runs one ``Deliverer`` while WEBHOOK_URLS is set (vault/app.py). It
claims due events from the outbox under a lease (``SecretStore.claim_events``: across
workers and replicas one deliverer at a time holds an event) and sends each to every
receiver that does not have it yet, as the Standard Webhooks specification asks: a POST of
the event's JSON body with ``webhook-id`` (the event's id, the same on every attempt),
``webhook-timestamp`` (this attempt's, in seconds) and ``webhook-signature`` (``v1,`` and
the base64 HMAC-SHA256 of ``id.timestamp.body`` under WEBHOOK_SECRET's key). An event
leaves the outbox once every receiver answered 2xx within WEBHOOK_TIMEOUT_SECONDS; else it
is due again after an exponential backoff, for the receivers still missing it, until
WEBHOOK_MAX_AGE_SECONDS after it was written, when it is dropped with a log line, an audit
record and a metric. At least once: a deliverer that dies after a receiver's 2xx, before
it settled the event, leaves it to be sent again, under the same id, when its lease ends.

Requests never wait on it: it is a task of its own, its HTTP calls run in threads of its
own (the standard library's ``http.client``, each thread keeping one connection alive per
receiver), each cut off at WEBHOOK_TIMEOUT_SECONDS, and at most ``CONCURRENCY`` events are
being sent, claimed in batches of what room there is. An event's room is free again once
its receivers answered: its settling (batched with the others', one store write) does not
hold it. While a backlog waits (the last claim filled its room) room is claimed again as
soon as a few events' worth has freed (BEHIND_BATCH), without the short wait that gathers
the events of requests close together into one claim. A receiver that does not answer at all
(refused, reset, timed out) is skipped, one probe at a time, until it answers again (a
circuit breaker per receiver), so a dead receiver does not hold up the others' events.
While every receiver is skipped the deliverer claims nothing but one event a second to
probe with: a dead receiver's backlog waits in the outbox untouched (no claim, no
reschedule per event) and is delivered once it answers again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import http.client
import logging
import os
import random
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from observability.audit import AuditRecord
from observability.metrics import (
    WEBHOOK_BACKLOG,
    WEBHOOK_DELIVERIES,
    WEBHOOK_DELIVERY_SECONDS,
    WEBHOOK_OLDEST_PENDING_SECONDS,
)
from vault.breaker import CircuitBreaker
from vault.events import PendingEvent
from vault.lifecycle import utc_now
from vault.settings import Settings
from vault.stores.base import SecretStore

log = logging.getLogger("secret_manager.webhooks")

CONCURRENCY = 16  # events in flight per process, each sent to its receivers at once
POLL_SECONDS = 0.25  # how often an idle deliverer asks the outbox what is due
GATHER_SECONDS = 0.02  # after a wake-up, before the claim: events close together, one claim
SETTLING_ROOMS = 4  # events sent and not yet settled, at most, per CONCURRENCY of them
BEHIND_BATCH = 4  # while behind, the room a claim waits for (of CONCURRENCY) while others send
# A lease outlives its attempt (at most WEBHOOK_TIMEOUT_SECONDS) and the store call that
# settles it: only a deliverer that died or hangs lets its events go to another.
LEASE_MARGIN_SECONDS = 10.0
FIRST_RETRY_SECONDS = 1.0  # the backoff after the first failed attempt, doubling after each
MAX_RETRY_SECONDS = 600.0
BACKLOG_SECONDS = 5.0  # how often the backlog gauges are refreshed from the store
STORE_RETRY_SECONDS = 1.0  # the pause after the store failed a claim
RECEIVER_RETRY_SECONDS = 1.0  # a receiver known not to answer is probed this often
SHUTDOWN_GRACE_SECONDS = 2.0  # in-flight deliveries may finish for this long at shutdown
USER_AGENT = "secret-manager-webhooks"
MAX_ANSWER_BYTES = 65536  # an answer's body read to keep its connection; a longer one closes it
# What a kept connection the receiver closed while it was idle fails with, before an answer.
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)

# What a deliverer hands a dropped event's audit record to (the audit writer's submit).
AuditSink = Callable[[AuditRecord], None]


def receiver_digest(url: str) -> str:
    """What the outbox records of a receiver that has an event: 16 hex digits of the SHA-256
    of its URL, never the URL (which may carry a token). Stable across restarts, whatever
    the order of WEBHOOK_URLS."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


def sign(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` and the base64 HMAC-SHA256 of
    ``id.timestamp.body`` under ``key`` (WEBHOOK_SECRET decoded)."""
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def retry_delay(attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds until the next attempt after ``attempts`` failed ones: 1 s doubling each
    time, at most 10 min, each drawn between half and all of that (jitter, so receivers
    coming back are not met by every deliverer at once)."""
    doublings = max(0, min(attempts - 1, 30))
    full = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * float(1 << doublings))
    return full * (0.5 + rand() / 2)


def dropped_record(pending: PendingEvent) -> AuditRecord:
    """The audit record of an event dropped undelivered: op ``webhook``, outcome
    ``dropped``, status 0 (no request was answered), the event's id as the request id, and
    the event's secret HMAC, key, tenant and client address where its data names them."""
    data = pending.event.data

    def text(*names: str) -> str | None:
        value = next((data[name] for name in names if name in data), None)
        return value if isinstance(value, str) else None

    return AuditRecord(
        ts=utc_now(),
        op="webhook",
        status=0,
        outcome="dropped",
        client_ip=text("client_ip") or "",
        request_id=pending.event.id,
        secret_id_hmac=text("secret_id_hmac"),
        latency_ms=0.0,
        user_agent=None,
        api_key_name=text("api_key_name", "key_name"),
        tenant=text("tenant"),
    )


class _Cut:
    """Between an exchange in a delivery thread and the task awaiting it: the task cuts the
    exchange off at its timeout by shutting the socket it uses, and only while it uses it
    (the thread's connection is kept for its next event)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._cut = False

    def begin(self, conn: http.client.HTTPConnection) -> bool:
        """The thread is about to use ``conn``; False when it was cut off already."""
        with self._lock:
            self._conn = conn
            return not self._cut

    def end(self) -> bool:
        """The thread is done with its connection; False when it was cut off."""
        with self._lock:
            self._conn = None
            return not self._cut

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sock = None if self._conn is None else self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Receiver:
    """One of WEBHOOK_URLS: where to POST, and whether it answers. Logged by its position
    in WEBHOOK_URLS (``receiver 2``), never by its URL."""

    def __init__(self, index: int, url: str) -> None:
        self.index = index
        self.digest = receiver_digest(url)
        parts = urllib.parse.urlsplit(url)
        self._https = parts.scheme.lower() == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._tls = ssl.create_default_context() if self._https else None
        self._local = threading.local()  # each delivery thread's kept connection to it
        self._kept: set[http.client.HTTPConnection] = set()  # every thread's, to close them
        self._kept_lock = threading.Lock()
        self._failing: str | None = None  # why it last failed, until it answers 2xx again
        self.breaker = CircuitBreaker(
            retry_after=RECEIVER_RETRY_SECONDS, on_close=self._answers_again
        )

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._tls is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _exchange(self, cut: _Cut, body: bytes, headers: dict[str, str], timeout: float) -> int:
        """In a delivery thread: the POST and the answer's status, on this thread's
        connection to the receiver (kept alive between events, opened again after an error
        or a ``Connection: close``). A kept connection the receiver closed meanwhile (its
        idle timeout) is retried once on a new one, before anything was answered."""
        while True:
            conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self._connection(timeout)
                with self._kept_lock:
                    self._kept.add(conn)
            fresh = conn.sock is None  # http.client connects it in request()
            if not cut.begin(conn):
                raise TimeoutError("cut off before it was sent")
            try:
                conn.request("POST", self._target, body=body, headers=headers)
                response = conn.getresponse()
                response.read(MAX_ANSWER_BYTES)  # drained: the connection carries the next
                if not response.isclosed():  # a long answer: not worth draining
                    raise http.client.HTTPException("answer too long to keep the connection")
                status = response.status
            except Exception as exc:
                self._forget(conn)
                stale = isinstance(exc, STALE_CONNECTION) and not fresh
                if cut.end() and stale:
                    continue  # the receiver closed a kept connection: once more, anew
                raise
            if not cut.end():  # cut off as it answered: its socket was shut
                self._forget(conn)
            return status

    def _forget(self, conn: http.client.HTTPConnection) -> None:
        """In a delivery thread: close its connection; the next exchange opens another."""
        self._local.conn = None
        with self._kept_lock:
            self._kept.discard(conn)
        conn.close()

    def close(self) -> None:
        """Close every kept connection (the deliverer stopped)."""
        with self._kept_lock:
            kept, self._kept = self._kept, set()
        for conn in kept:
            with contextlib.suppress(Exception):
                conn.close()

    async def post(
        self, body: bytes, headers: dict[str, str], timeout: float, threads: ThreadPoolExecutor
    ) -> int:
        """The status the receiver answered within ``timeout`` seconds, whole exchange
        included; TimeoutError, OSError or an http.client error when it did not. A call cut
        off has its socket shut, so its thread returns at once."""
        cut = _Cut()
        exchange = asyncio.get_running_loop().run_in_executor(
            threads, self._exchange, cut, body, headers, timeout
        )
        try:
            async with asyncio.timeout(timeout):
                return await exchange
        except BaseException:
            cut.cut()
            raise

    def failed(self, reason: str) -> None:
        """Log the first failure of a run of them; each one at DEBUG."""
        if self._failing is None:
            log.warning(
                "webhook receiver %d failed (%s); its deliveries are retried with backoff",
                self.index,
                reason,
            )
        self._failing = reason

    def delivered(self) -> None:
        self._answers_again()

    def _answers_again(self) -> None:
        if self._failing is not None:
            log.warning("webhook receiver %d answers 2xx again", self.index)
            self._failing = None


class Deliverer:
    """Drains the store's outbox to the receivers; see the module docstring. ``start`` it on
    the serving event loop, ``stop`` it before the store closes."""

    def __init__(
        self,
        store: SecretStore,
        urls: Sequence[str],
        key: bytes,
        *,
        timeout: float,
        max_age: float,
        audit: AuditSink | None = None,
        owner: str | None = None,
        poll: float = POLL_SECONDS,
        concurrency: int = CONCURRENCY,
    ) -> None:
        if not urls:
            raise ValueError("a deliverer needs at least one receiver")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._store = store
        self._receivers = [Receiver(index, url) for index, url in enumerate(urls, start=1)]
        self._key = key
        self._timeout = timeout
        self._max_age = dt.timedelta(seconds=max_age)
        self._audit = audit
        # Unique per deliverer: a lease is this process's, not its host's or its pid's alone.
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self._poll = poll
        self._concurrency = concurrency
        self._lease = timeout + LEASE_MARGIN_SECONDS
        self._threads = ThreadPoolExecutor(
            max_workers=concurrency * len(self._receivers), thread_name_prefix="webhooks"
        )
        self._in_flight: set[asyncio.Task[None]] = set()  # being sent, or settled
        self._sending = 0  # of those, how many are still being sent
        self._behind = False  # the last claim filled its room: more may be due
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._store_failing: str | None = None
        self._backlog_due = 0.0
        self._next_probe_claim = 0.0  # while every receiver is skipped: the next probe's claim

    @classmethod
    def from_settings(
        cls, settings: Settings, store: SecretStore, audit: AuditSink | None
    ) -> Deliverer | None:
        """The deliverer the settings ask for; None while WEBHOOK_URLS is unset."""
        if not settings.webhook_urls or settings.webhook_secret is None:
            return None
        return cls(
            store,
            settings.webhook_urls,
            settings.webhook_secret,
            timeout=settings.webhook_timeout_seconds,
            max_age=settings.webhook_max_age_seconds,
            audit=audit,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="webhook-deliverer")

    def wake(self) -> None:
        """Look at the outbox now rather than at the next poll (events were just written).
        Call it on the deliverer's event loop (a request handler's)."""
        self._wakeup.set()

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop claiming; let deliveries in flight finish for ``grace`` seconds, then
        abandon them (their leases end, and another deliverer sends them again)."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._threads.shutdown(wait=False, cancel_futures=True)
        for receiver in self._receivers:
            receiver.close()

    async def run(self) -> None:
        """Claim, deliver, settle, until stopped; a failure is logged and tried again."""
        while not self._stopping:
            try:
                await self._refresh_backlog()
                room = self._claimable(self._room())
                if room > 0 and self._worth_claiming(room):
                    claimed = await self._claim(room)
                    if claimed is None:  # the store failed: it was logged
                        self._behind = False
                        await asyncio.sleep(STORE_RETRY_SECONDS)
                        continue
                    for pending in claimed:
                        self._begin(pending)
                    self._behind = len(claimed) == room
                    if self._behind:
                        continue  # more may be due: ask again at once
                await self._idle()
            except Exception as exc:  # never ends the process's deliveries
                log.error("webhook deliverer failed (%s); going on", type(exc).__name__)
                await asyncio.sleep(STORE_RETRY_SECONDS)

    def _room(self) -> int:
        """Events that may be claimed now: room among those being sent, and among those
        sent but not settled yet (a store slow to settle slows the claims too)."""
        settling = SETTLING_ROOMS * self._concurrency - len(self._in_flight)
        return min(self._concurrency - self._sending, settling)

    def _worth_claiming(self, room: int) -> bool:
        """While behind, room freed one event at a time is claimed a few at a time (each
        claim is a store write, whatever its size), unless no event is being sent or settled."""
        floor = min(BEHIND_BATCH, self._concurrency)
        return not self._behind or room >= floor or not self._in_flight

    def _claimable(self, room: int) -> int:
        """How many events to claim now, given room for ``room``: all of it while some
        receiver answers (an event is sent to the live ones; the skipped ones get it with its
        next attempt, rescheduled in the settle batch); while every receiver is skipped
        (breaker open), nothing, so that a dead receiver's backlog is not claimed and
        rescheduled event by event, except a single event, at most once per
        RECEIVER_RETRY_SECONDS, when one may be probed."""
        if room <= 0 or any(not r.breaker.is_open for r in self._receivers):
            return room
        now = time.monotonic()
        if now < self._next_probe_claim:
            return 0
        if all(r.breaker.refuses_now() for r in self._receivers):
            return 0  # none may be probed yet, or a probe is in flight
        self._next_probe_claim = now + RECEIVER_RETRY_SECONDS
        return 1

    async def _idle(self) -> None:
        """Wait for the next poll, a wake-up, or room for more events. After a wake-up a
        little longer (GATHER_SECONDS), so that the events of requests close together, and
        the room of deliveries ending together, make one claim rather than one each; but
        not while behind (the last claim filled its room): the room that frees is claimed
        at once, the claim's own round trips gathering what frees meanwhile, where the wait
        capped the events a second that a backlog drains at."""
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._poll):
                await self._wakeup.wait()
                if not self._behind:
                    await asyncio.sleep(GATHER_SECONDS)

    async def _claim(self, room: int) -> list[PendingEvent] | None:
        try:
            claimed = await self._store.claim_events(self.owner, utc_now(), self._lease, room)
        except Exception as exc:
            reason = type(exc).__name__
            if self._store_failing is None:
                log.warning("webhook deliveries wait for the store (%s)", reason)
            self._store_failing = reason
            return None
        if self._store_failing is not None:
            log.warning("webhook deliveries go on: the store answers again")
            self._store_failing = None
        return claimed

    async def _refresh_backlog(self) -> None:
        if time.monotonic() < self._backlog_due:
            return
        self._backlog_due = time.monotonic() + BACKLOG_SECONDS
        now = utc_now()
        try:
            count, oldest = await self._store.outbox_backlog(now)
        except Exception:  # the claim that follows meets it too, and logs it
            return
        WEBHOOK_BACKLOG.set(count)
        age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        WEBHOOK_OLDEST_PENDING_SECONDS.set(age)

    def _begin(self, pending: PendingEvent) -> None:
        self._sending += 1
        task = asyncio.create_task(self._handle(pending))
        self._in_flight.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._in_flight.discard(task)
            self._wakeup.set()  # room for one more

        task.add_done_callback(done)

    def _sent(self) -> None:
        """An event's sending is over (its settling may not be): room for one more."""
        self._sending -= 1
        self._wakeup.set()

    async def _handle(self, pending: PendingEvent) -> None:
        """Send one claimed event to the receivers still missing it, then settle it."""
        event = pending.event
        sending = True
        try:
            deadline = pending.created_at + self._max_age
            if utc_now() >= deadline:
                sending = False
                self._sent()
                await self._drop(pending)
                return
            missing = [r for r in self._receivers if r.digest not in pending.delivered_to]
            try:
                answers = await asyncio.gather(*(self._send(r, pending) for r in missing))
            finally:
                sending = False
                self._sent()
            if all(answers):
                await self._store.event_delivered(event.id, self.owner)
                return
            have = pending.delivered_to | {
                r.digest for r, ok in zip(missing, answers, strict=True) if ok
            }
            delay = dt.timedelta(seconds=retry_delay(pending.attempts + 1))
            # Never later than its deadline, when the claim that finds it due drops it.
            next_attempt = min(utc_now() + delay, deadline)
            await self._store.event_failed(event.id, self.owner, next_attempt, have)
        except Exception as exc:  # not settled: its lease ends, and it is tried again
            log.warning(
                "webhook event %s not settled (%s); it is tried again when its lease ends",
                event.id,
                type(exc).__name__,
            )
        finally:
            if sending:  # ended before its sending did (the deadline's clock failed)
                self._sent()

    async def _send(self, receiver: Receiver, pending: PendingEvent) -> bool:
        """One attempt to one receiver: whether it answered 2xx in time."""
        call = receiver.breaker.try_call()
        if call is None:  # known not to answer: tried again with the event's next attempt
            return False
        event = pending.event
        body = pending.body.encode("utf-8")
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._key, event.id, timestamp, body),
        }
        try:
            status = await receiver.post(body, headers, self._timeout, self._threads)
        except asyncio.CancelledError:
            receiver.breaker.abandoned(call)
            raise
        except Exception as exc:  # refused, reset, timed out, TLS, a garbled answer
            receiver.breaker.failed(call)
            reason = (
                f"no answer within {self._timeout:g} s"
                if isinstance(exc, TimeoutError)
                else type(exc).__name__
            )
            self._failed(receiver, pending, reason)
            return False
        receiver.breaker.succeeded(call)  # it answered, whatever it said
        if 200 <= status < 300:
            WEBHOOK_DELIVERIES.labels(event.type, "delivered").inc()
            seconds = max(0.0, (utc_now() - event.at).total_seconds())
            WEBHOOK_DELIVERY_SECONDS.labels(event.type).observe(seconds)
            receiver.delivered()
            return True
        self._failed(receiver, pending, f"HTTP {status}")
        return False

    def _failed(self, receiver: Receiver, pending: PendingEvent, reason: str) -> None:
        WEBHOOK_DELIVERIES.labels(pending.event.type, "failed").inc()
        receiver.failed(reason)
        log.debug(
            "webhook event %s to receiver %d failed (%s), attempt %d",
            pending.event.id,
            receiver.index,
            reason,
            pending.attempts + 1,
        )

    async def _drop(self, pending: PendingEvent) -> None:
        """Give up an event past WEBHOOK_MAX_AGE_SECONDS: one log line (its id and type,
        nothing of its data), an audit record, a metric."""
        event = pending.event
        if not await self._store.drop_event(event.id, self.owner):
            return  # another deliverer has it now, and drops it itself
        missing = [r.index for r in self._receivers if r.digest not in pending.delivered_to]
        log.warning(
            "webhook event %s (%s) dropped after %d attempts: receiver %s never answered 2xx "
            "within WEBHOOK_MAX_AGE_SECONDS",
            event.id,
            event.type,
            pending.attempts,
            ", ".join(map(str, missing)) or "-",
        )
        WEBHOOK_DELIVERIES.labels(event.type, "dropped").inc()
        if self._audit is not None:
            self._audit(dropped_record(pending))
