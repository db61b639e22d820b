"""Webhook delivery (vault/webhooks.py) against a real HTTP receiver on 127.0.0.1 and real
stores: every delivery verified with the reference Standard Webhooks implementation,
retries under the same webhook-id, receivers down or hanging, leases across processes,
events dropped past their age, and the serving process's lifespan running it all."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import secrets
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx2 as httpx
import pymongo
import pytest
from standardwebhooks.webhooks import Webhook
from starlette.testclient import TestClient

from observability.audit import AuditRecord
from observability.metrics import WEBHOOK_DELIVERIES
from tests.conftest import ServerProcess, b64, on_store, wait_until
from tests.webhook_receiver import FAIL, HANG, OK, Receiver, verified
from vault.app import create_app
from vault.backend import backend_for
from vault.errors import ConfigError
from vault.events import EVENT_TYPES, READ, Event, event_body
from vault.settings import Settings
from vault.stores.base import SecretStore
from vault.webhooks import (
    MAX_RETRY_SECONDS,
    Deliverer,
    retry_delay,
    sign,
)

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
KEY = base64.b64decode(SECRET.removeprefix("whsec_"))


def event(kind: str = READ, **data: Any) -> Event:
    return Event(kind, dt.datetime.now(dt.UTC), {"label": "deploy token", **data})


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture
def second_receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def delivering(
    env: dict[str, str], urls: list[str], **options: Any
) -> AsyncIterator[tuple[SecretStore, Deliverer]]:
    """A real store opened from ``env``, and a deliverer draining it to ``urls``."""
    store = backend_for(Settings.from_env(env)).open()
    await store.open()
    options = {"timeout": 2.0, "max_age": 3600.0, "poll": 0.05, **options}
    deliverer = Deliverer(store, urls, KEY, **options)
    deliverer.start()
    try:
        yield store, deliverer
    finally:
        await deliverer.stop()
        await store.close()


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


# --- signing and scheduling -------------------------------------------------------------


def test_the_signature_is_the_reference_implementations() -> None:
    body = event_body(event()).encode()
    stamp = int(time.time())
    expected = Webhook(SECRET).sign("msg_1", dt.datetime.fromtimestamp(stamp, dt.UTC), body)
    assert sign(KEY, "msg_1", stamp, body) == expected


def test_the_backoff_doubles_from_a_second_up_to_ten_minutes_with_jitter() -> None:
    assert [retry_delay(n, lambda: 1.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert retry_delay(11, lambda: 1.0) == MAX_RETRY_SECONDS
    assert retry_delay(500, lambda: 1.0) == MAX_RETRY_SECONDS
    assert retry_delay(3, lambda: 0.0) == 2.0  # at least half of it


# --- settings -------------------------------------------------------------------------


def settings(**env: str) -> Settings:
    return Settings.from_env({"MASTER_KEY": b64(b"k" * 32), **env})


def test_webhooks_are_off_by_default_and_write_no_events() -> None:
    plain = settings()
    assert plain.webhook_urls == () and plain.emitted_events == frozenset()
    assert plain.webhook_events == EVENT_TYPES
    assert (plain.webhook_timeout_seconds, plain.webhook_max_age_seconds) == (10.0, 86400.0)


def test_the_webhook_settings_are_read_and_checked() -> None:
    on = settings(
        WEBHOOK_URLS="https://hooks.example.com/a?token=x, http://10.0.0.7:8080/b",
        WEBHOOK_SECRET=SECRET,
        WEBHOOK_EVENTS="secret.read, secret.used_up",
    )
    assert on.webhook_urls == ("https://hooks.example.com/a?token=x", "http://10.0.0.7:8080/b")
    assert on.webhook_secret == KEY
    assert on.emitted_events == {"secret.read", "secret.used_up"}
    assert "token=x" not in repr(on) and SECRET not in repr(on)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WEBHOOK_URLS": "https://h.example/x"}, "WEBHOOK_URLS is set but WEBHOOK_SECRET"),
        ({"WEBHOOK_URLS": "ftp://h.example/x"}, "WEBHOOK_URLS: entry 1 is not an http"),
        ({"WEBHOOK_URLS": "https://h/x,/relative"}, "WEBHOOK_URLS: entry 2 is not an http"),
        ({"WEBHOOK_URLS": "https://u:p@h.example/"}, "WEBHOOK_URLS: entry 1 carries a user"),
        ({"WEBHOOK_SECRET": "c2VjcmV0"}, "WEBHOOK_SECRET must be whsec_"),
        ({"WEBHOOK_SECRET": "whsec_!!"}, "WEBHOOK_SECRET is not whsec_ followed by base64"),
        ({"WEBHOOK_SECRET": "whsec_c2VjcmV0"}, "WEBHOOK_SECRET must hold 24 to 64 bytes"),
        ({"WEBHOOK_EVENTS": "secret.read,secret.opened"}, "WEBHOOK_EVENTS names 'secret.opened'"),
        ({"WEBHOOK_TIMEOUT_SECONDS": "0"}, "WEBHOOK_TIMEOUT_SECONDS must be at least"),
        ({"WEBHOOK_MAX_AGE_SECONDS": "soon"}, "WEBHOOK_MAX_AGE_SECONDS must be a number"),
    ],
)
def test_a_bad_webhook_setting_stops_start_up_naming_it(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        settings(**env)
    assert str(refused.value).startswith(message)
    assert "u:p" not in str(refused.value) and "c2VjcmV0" not in str(refused.value)


def test_the_secret_and_the_urls_may_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "urls").write_text("https://a.example/1\nhttps://b.example/2\n")
    (tmp_path / "secret").write_text(SECRET + "\n")
    on = settings(
        WEBHOOK_URLS_FILE=str(tmp_path / "urls"), WEBHOOK_SECRET_FILE=str(tmp_path / "secret")
    )
    assert on.webhook_urls == ("https://a.example/1", "https://b.example/2")
    assert on.webhook_secret == KEY


# --- delivery, in process, on both stores -----------------------------------------------


def test_every_event_type_arrives_signed_once_and_leaves_the_outbox(
    store_env: dict[str, str], receiver: Receiver
) -> None:
    events = [event(kind, n=n) for n, kind in enumerate(EVENT_TYPES)]
    before = {
        kind: WEBHOOK_DELIVERIES.labels(kind, "delivered")._value.get() for kind in EVENT_TYPES
    }

    async def main() -> tuple[int, dt.datetime | None]:
        async with delivering(store_env, [receiver.url]) as (store, _):
            await store.add_events(events)
            await until(lambda: len(receiver.acknowledged()) == len(events), 10, "the events")
            await asyncio.sleep(0.3)  # settled, and nothing sent twice meanwhile
            return await store.outbox_backlog(dt.datetime.now(dt.UTC))

    assert asyncio.run(main()) == (0, None)
    got = receiver.snapshot()
    assert sorted(d.id for d in got) == sorted(e.id for e in events)  # each once
    for delivery in got:
        made = next(e for e in events if e.id == delivery.id)
        assert verified(SECRET, delivery) == made.payload()
        assert delivery.body == event_body(made).encode()  # compact JSON, the signed bytes
        assert delivery.headers["content-type"] == "application/json"
        assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 30
        assert delivery.path == "/hooks"
    for kind in EVENT_TYPES:
        assert WEBHOOK_DELIVERIES.labels(kind, "delivered")._value.get() == before[kind] + 1


def test_a_receiver_down_then_back_gets_every_event_under_its_first_id(
    tmp_path: Path, master_key: str, receiver: Receiver
) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    events = [event(n=n) for n in range(20)]

    async def main() -> None:
        async with delivering(env, [receiver.url]) as (store, _):
            receiver.mode = FAIL
            await store.add_events(events[:10])
            await until(lambda: len(receiver.snapshot()) >= 10, 10, "refused attempts")
            receiver.stop()  # down: connections refused
            await store.add_events(events[10:])
            await asyncio.sleep(3)
            receiver.mode = OK
            receiver.start()
            await until(lambda: len(receiver.acknowledged_ids()) == 20, 30, "every event")

    asyncio.run(main())
    got = receiver.snapshot()
    assert receiver.acknowledged_ids() == {e.id for e in events}
    assert {d.id for d in got} == {e.id for e in events}  # no id but the events' own
    tries = Counter(d.id for d in got)
    assert all(tries[e.id] >= 2 for e in events[:10])  # retried, under the same webhook-id
    assert all(verified(SECRET, d) for d in got)
    assert Counter(d.id for d in receiver.acknowledged()).most_common(1)[0][1] == 1


def test_a_dead_receiver_does_not_hold_up_a_live_one_nor_is_a_live_one_sent_twice(
    tmp_path: Path, master_key: str, receiver: Receiver, second_receiver: Receiver
) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    events = [event(n=n) for n in range(10)]
    second_receiver.mode = HANG

    async def main() -> None:
        urls = [receiver.url, second_receiver.url]
        async with delivering(env, urls, timeout=1.0) as (store, _):
            started = time.monotonic()
            await store.add_events(events)
            await until(lambda: len(receiver.acknowledged_ids()) == 10, 10, "the live one")
            assert time.monotonic() - started < 3  # not after the hanging one's timeouts
            second_receiver.stop()
            second_receiver.mode = OK
            second_receiver.start()
            await until(lambda: len(second_receiver.acknowledged_ids()) == 10, 30, "the other")
            await asyncio.sleep(0.5)
            assert await store.outbox_backlog(dt.datetime.now(dt.UTC)) == (0, None)

    asyncio.run(main())
    assert Counter(d.id for d in receiver.snapshot()).most_common(1)[0][1] == 1
    hung = {d.id for d in second_receiver.snapshot() if d.status == 0}
    assert hung and hung <= {e.id for e in events}


class CountingStore:
    """A real store, its outbox writes counted: each claim and each settlement (delivered,
    failed, dropped) the deliverer asks of it. Everything else goes straight through."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store
        self.claims = 0
        self.settles = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def claim_events(self, *args: Any) -> Any:
        self.claims += 1
        return await self.store.claim_events(*args)

    async def event_failed(self, *args: Any) -> Any:
        self.settles += 1
        return await self.store.event_failed(*args)

    async def event_delivered(self, *args: Any) -> Any:
        self.settles += 1
        return await self.store.event_delivered(*args)

    async def drop_event(self, *args: Any) -> Any:
        self.settles += 1
        return await self.store.drop_event(*args)

    def writes(self) -> int:
        return self.claims + self.settles


def test_a_dead_receivers_backlog_is_left_in_the_outbox_not_claimed_event_by_event(
    store_env: dict[str, str], receiver: Receiver
) -> None:
    """The only receiver dead, N events pending: the deliverer claims one event a second to
    probe it, not every event rescheduled one by one; every event arrives once it is back."""
    events = [event(n=n) for n in range(200)]
    receiver.stop()  # dead: its port refuses connections

    async def main() -> tuple[int, int]:
        store = backend_for(Settings.from_env(store_env)).open()
        await store.open()
        counting = CountingStore(store)
        deliverer = Deliverer(
            cast(SecretStore, counting),
            [receiver.url],
            KEY,
            timeout=1.0,
            max_age=3600,
            poll=0.05,
            concurrency=16,
        )
        deliverer.start()
        try:
            await store.add_events(events)
            await until(lambda: counting.settles >= 1, 10, "the first failed attempts")
            await asyncio.sleep(0.5)  # the first claim's attempts settled
            before = counting.writes()
            await asyncio.sleep(4)
            during = counting.writes() - before
            receiver.mode = OK
            receiver.start()
            await until(lambda: len(receiver.acknowledged_ids()) == 200, 40, "every event")
            await asyncio.sleep(0.3)
            backlog, _ = await store.outbox_backlog(dt.datetime.now(dt.UTC))
            return during, backlog
        finally:
            await deliverer.stop()
            await store.close()

    during, backlog = asyncio.run(main())
    # Four seconds of a dead receiver: a probe claim and its settle a second, not 200 events.
    assert during <= 12, during
    assert backlog == 0
    assert receiver.acknowledged_ids() == {e.id for e in events}


class SlowSettlingStore(CountingStore):
    """A real store whose settlements each take SETTLE_SECONDS longer (a store slow to
    write), counted; and each claim's size noted."""

    SETTLE_SECONDS = 1.0

    def __init__(self, store: SecretStore, sent: Callable[[], int] = lambda: 0) -> None:
        super().__init__(store)
        self.sizes: list[int] = []
        self._sent = sent
        # How many events the receiver had when the first settle returned.
        self.sent_at_first_settle: int | None = None
        self.settled = 0  # settlements the store has answered (``settles``: asked for)

    async def claim_events(self, *args: Any) -> Any:
        claimed = await super().claim_events(*args)
        self.sizes.append(len(claimed))
        return claimed

    async def event_delivered(self, *args: Any) -> Any:
        await asyncio.sleep(self.SETTLE_SECONDS)
        if self.sent_at_first_settle is None:
            self.sent_at_first_settle = self._sent()
        done = await super().event_delivered(*args)
        self.settled += 1
        return done


def test_a_backlog_drains_without_waiting_on_each_settle_nor_between_full_claims(
    store_env: dict[str, str], receiver: Receiver
) -> None:
    """320 events waiting, 16 sent at a time, each settle taking a second: the
    backlog drains in claims one after the other, of several events each, each event's
    room free as soon as the receiver answered, not once its settle is written (which let
    16 events out a second, whatever the receiver's speed)."""
    events = [event(n=n) for n in range(320)]

    async def main() -> tuple[int | None, list[int]]:
        store = backend_for(Settings.from_env(store_env)).open()
        await store.open()
        slow = SlowSettlingStore(store, lambda: len(receiver.snapshot()))
        deliverer = Deliverer(
            cast(SecretStore, slow), [receiver.url], KEY, timeout=5.0, max_age=3600
        )
        try:
            await store.add_events(events)
            deliverer.start()
            await until(lambda: slow.settled == 320, 60, "every event settled")
            backlog, _ = await store.outbox_backlog(dt.datetime.now(dt.UTC))
            assert backlog == 0
            return slow.sent_at_first_settle, slow.sizes
        finally:
            await deliverer.stop()
            await store.close()

    sent, sizes = asyncio.run(main())
    # Sending went on while the first settles were still being written: more than the 16
    # rooms' worth had reached the receiver before the first settle returned (room held
    # until the settle allowed 16 at most), whatever the machine's speed.
    assert sent is not None and sent > 16, sent
    assert sorted(d.id for d in receiver.snapshot()) == sorted(e.id for e in events)  # once
    assert sum(sizes) == 320 and max(sizes) <= 16
    # Room freed one event at a time is claimed a few at a time: each claim is a write.
    assert sum(1 for n in sizes if n) <= 64, sizes


def test_a_connection_to_a_receiver_is_kept_for_the_next_events_and_reopened_when_closed(
    tmp_path: Path, master_key: str, receiver: Receiver
) -> None:
    """One delivery thread, one connection: 30 events over it, not 30 connections; the
    receiver restarted (it closed the kept connection), the next event goes on a new one at
    once, not counted as a failure nor retried after a backoff."""
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    events = [event(n=n) for n in range(30)]
    late = event(n=30)
    failed = WEBHOOK_DELIVERIES.labels(READ, "failed")._value.get()

    async def main() -> float:
        async with delivering(env, [receiver.url], concurrency=1) as (store, _):
            await store.add_events(events)
            await until(lambda: len(receiver.acknowledged_ids()) == 30, 10, "the events")
            receiver.stop()
            receiver.start()
            started = time.monotonic()
            await store.add_events([late])
            await until(lambda: late.id in receiver.acknowledged_ids(), 10, "the late one")
            return time.monotonic() - started

    took = asyncio.run(main())
    assert took < 0.9  # not after the 1 s backoff of a failed attempt
    got = receiver.snapshot()
    assert sorted(d.id for d in got) == sorted(e.id for e in [*events, late])  # each once
    assert got[-1].id == late.id
    assert len({d.peer for d in got[:30]}) == 1
    assert got[30].peer != got[0].peer
    assert WEBHOOK_DELIVERIES.labels(READ, "failed")._value.get() == failed


def test_an_event_past_its_age_is_dropped_with_a_log_line_an_audit_record_and_a_metric(
    tmp_path: Path, master_key: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    receiver.mode = FAIL
    doomed = event(secret_id_hmac="ab" * 32, tenant="acme", client_ip="10.0.0.9")
    audited: list[AuditRecord] = []
    before = WEBHOOK_DELIVERIES.labels(READ, "dropped")._value.get()

    async def main() -> tuple[int, dt.datetime | None]:
        async with delivering(env, [receiver.url], max_age=1.5, audit=audited.append) as (
            store,
            _,
        ):
            await store.add_events([doomed])
            await until(lambda: bool(audited), 10, "the drop")
            return await store.outbox_backlog(dt.datetime.now(dt.UTC))

    with caplog.at_level(logging.WARNING, logger="secret_manager.webhooks"):
        assert asyncio.run(main()) == (0, None)
    assert len(receiver.snapshot()) >= 2  # tried, and retried, until its time was up
    [record] = audited
    assert (record.op, record.outcome, record.status) == ("webhook", "dropped", 0)
    assert (record.request_id, record.secret_id_hmac) == (doomed.id, "ab" * 32)
    assert (record.tenant, record.client_ip) == ("acme", "10.0.0.9")
    [line] = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert doomed.id in line and READ in line and "deploy token" not in line
    assert WEBHOOK_DELIVERIES.labels(READ, "dropped")._value.get() == before + 1


def test_a_hanging_receiver_is_cut_off_at_the_timeout_and_stop_does_not_wait_for_it(
    tmp_path: Path, master_key: str, receiver: Receiver
) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    receiver.mode = HANG

    async def main() -> float:
        store = backend_for(Settings.from_env(env)).open()
        await store.open()
        deliverer = Deliverer(store, [receiver.url], KEY, timeout=0.5, max_age=60, poll=0.05)
        deliverer.start()
        try:
            await store.add_events([event()])
            await until(lambda: len(receiver.snapshot()) >= 2, 10, "a retry after the timeout")
            started = time.monotonic()
            await deliverer.stop(grace=0.2)
            return time.monotonic() - started
        finally:
            await store.close()

    assert asyncio.run(main()) < 2


# --- the serving process ------------------------------------------------------------------


def webhook_env(env: dict[str, str], *urls: str, **extra: str) -> dict[str, str]:
    return {**env, "WEBHOOK_URLS": ",".join(urls), "WEBHOOK_SECRET": SECRET, **extra}


def add_events(env: dict[str, str], events: list[Event]) -> None:
    async def work(store: SecretStore) -> None:
        await store.add_events(events)

    on_store(env, work)


@pytest.mark.slow
def test_a_server_delivers_from_a_shared_store_and_drops_what_ages_out(
    tmp_path: Path,
    master_key: str,
    receiver: Receiver,
    start_server: Callable[..., ServerProcess],
) -> None:
    """The lifespan runs the deliverer: events another process writes to the store arrive,
    signed; with the receiver failing, an event past WEBHOOK_MAX_AGE_SECONDS is dropped with
    its log line, audit record and metric; a hanging receiver leaves /readyz and the API
    as they were."""
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    server = start_server(webhook_env(env, receiver.url, WEBHOOK_MAX_AGE_SECONDS="3"))
    delivered = [event(n=n) for n in range(5)]
    add_events(env, delivered)
    receiver.wait_for(lambda r: len(r.acknowledged_ids()) == 5, 15, "the server's deliveries")
    assert all(verified(SECRET, d) for d in receiver.snapshot())

    receiver.mode = FAIL
    doomed = event(secret_id_hmac="cd" * 32)
    add_events(env, [doomed])
    wait_until(lambda: "dropped after" in server.output(), 20, "the drop's log line")
    [line] = [x for x in server.output().splitlines() if "dropped after" in x]
    assert doomed.id in line and "deploy token" not in line
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "vault.db")) as conn:
        rows = conn.execute(
            "SELECT op, outcome, status, secret_id_hmac FROM audit WHERE request_id = ?",
            (doomed.id,),
        ).fetchall()
    assert rows == [("webhook", "dropped", 0, "cd" * 32)]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'vault_webhook_deliveries_total{event="secret.read",result="dropped"} 1.0' in metrics
    assert 'vault_webhook_deliveries_total{event="secret.read",result="delivered"} 5.0' in metrics

    receiver.mode = HANG
    add_events(env, [event()])
    receiver.wait_for(lambda r: r.snapshot()[-1].status == 0, 10, "a hanging delivery")
    assert httpx.get(server.url + "/readyz").status_code == 200
    created = httpx.post(server.url + "/vault/secret/create", json={"secret": b64(b"x")})
    assert created.status_code == 200
    assert server.stop() == 0


@pytest.mark.slow
def test_replicas_and_workers_sharing_mongodb_deliver_each_event_once(
    mongo_uri: str,
    master_key: str,
    receiver: Receiver,
    start_server: Callable[..., ServerProcess],
) -> None:
    """Two replicas, one of them with two workers: three deliverers on one database, and a
    healthy receiver sees each event exactly once."""
    env = {
        "MASTER_KEY": master_key,
        "MONGO_URI": mongo_uri,
        "MONGO_DB": f"t{uuid.uuid4().hex[:16]}",
    }
    hooked = webhook_env(env, receiver.url)
    start_server(hooked, "--workers", "2")
    start_server(hooked)
    events = [event(n=n) for n in range(150)]
    for start in range(0, len(events), 10):  # while they run, as requests would
        add_events(env, events[start : start + 10])
    receiver.wait_for(lambda r: len(r.acknowledged_ids()) == 150, 60, "every event")
    time.sleep(1.0)  # anything sent twice would have arrived by now
    seen = Counter(d.id for d in receiver.snapshot())
    assert set(seen) == {e.id for e in events}
    assert seen.most_common(1)[0][1] == 1, "an event was delivered twice"
    with pymongo.MongoClient(mongo_uri) as client:
        assert client[env["MONGO_DB"]]["outbox"].count_documents({}) == 0
    body = json.loads(receiver.snapshot()[0].body)
    assert set(body) == {"type", "timestamp", "data"}


@pytest.mark.slow
def test_a_deliverer_killed_mid_delivery_leaves_the_event_to_the_next_under_its_id(
    tmp_path: Path,
    master_key: str,
    receiver: Receiver,
    start_server: Callable[..., ServerProcess],
) -> None:
    """SIGKILL while the event is leased and its delivery hangs: once the lease ends (the
    timeout and 10 s), the restarted server sends it, under the same webhook-id."""
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    hooked = webhook_env(env, receiver.url, WEBHOOK_TIMEOUT_SECONDS="1")
    receiver.mode = HANG
    first = start_server(hooked)
    pending = event()
    add_events(env, [pending])
    receiver.wait_for(lambda r: len(r.snapshot()) == 1, 10, "the hanging delivery")
    first.process.kill()
    first.process.wait()
    receiver.mode = OK
    killed_at = time.monotonic()
    start_server(hooked)
    receiver.wait_for(lambda r: r.acknowledged_ids() == {pending.id}, 30, "the redelivery")
    assert {d.id for d in receiver.snapshot()} == {pending.id}
    assert all(verified(SECRET, d) for d in receiver.acknowledged())
    # Not before the killed deliverer's lease ended (claimed a moment before the kill).
    assert receiver.acknowledged()[0].at - killed_at > 5


def test_the_app_runs_a_deliverer_only_with_webhooks_on_and_a_request_may_wake_it(
    tmp_path: Path, master_key: str, receiver: Receiver
) -> None:
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    with TestClient(create_app(Settings.from_env(env))) as client:
        assert client.app.state.webhooks is None  # type: ignore[attr-defined]
    with TestClient(create_app(Settings.from_env(webhook_env(env, receiver.url)))) as client:
        deliverer = client.app.state.webhooks  # type: ignore[attr-defined]
        assert isinstance(deliverer, Deliverer)
        pending = event()
        add_events(env, [pending])
        assert client.portal is not None
        client.portal.call(deliverer.wake)  # on the app's event loop, as a request would
        receiver.wait_for(lambda r: r.acknowledged_ids() == {pending.id}, 10, "the event")
