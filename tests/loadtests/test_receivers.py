"""The bench's webhook receivers: the healthy one answers 200 at once and times each
delivery from its event's timestamp, counting repeated webhook-ids; the hanging one holds
every connection without an answer; both close everything when they stop."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import math
import time
import urllib.parse

import pytest

from loadtests.receivers import Deliveries, Delivery, percentile, receiver


def post(url: str, webhook_id: str, body: bytes, timeout: float = 5) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:  # one request on a connection of its own
        conn.request(
            "POST", parts.path, body=body,
            headers={"Content-Type": "application/json", "webhook-id": webhook_id},
        )  # fmt: skip
        return conn.getresponse().status
    finally:
        conn.close()


def event(kind: str, at: dt.datetime) -> bytes:
    stamp = at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"type": kind, "timestamp": stamp, "data": {}}).encode()


def test_the_healthy_receiver_answers_200_and_times_each_delivery_from_its_change() -> None:
    with receiver(hang=False) as healthy:
        changed = dt.datetime.now(dt.UTC) - dt.timedelta(milliseconds=250)
        assert post(healthy.url, "msg_a", event("secret.created", changed)) == 200
        assert post(healthy.url, "msg_b", event("secret.read", changed)) == 200
        assert post(healthy.url, "msg_a", event("secret.created", changed)) == 200  # a repeat
        received = healthy.take()
        assert healthy.take() == []  # each delivery is taken once
    assert [(d.webhook_id, d.type) for d in received] == [
        ("msg_a", "secret.created"), ("msg_b", "secret.read"), ("msg_a", "secret.created"),
    ]  # fmt: skip
    for delivery in received:  # 250 ms before the POST, the stamp cut to the millisecond
        assert 250 <= delivery.latency_ms < 250 + 5000
    run = Deliveries.of(received, undelivered=2)
    assert run.count == 3 and run.duplicates == 1 and run.undelivered == 2
    assert run.types == {"secret.created": 2, "secret.read": 1}


def test_the_healthy_receiver_keeps_a_connection_for_the_next_request() -> None:
    with receiver(hang=False) as healthy:
        parts = urllib.parse.urlsplit(healthy.url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
        try:  # as the service's deliverer sends them: one after the other, kept alive
            for webhook_id in ("msg_a", "msg_b", "msg_c"):
                body = event("secret.read", dt.datetime.now(dt.UTC))
                conn.request("POST", parts.path, body=body, headers={"webhook-id": webhook_id})
                response = conn.getresponse()
                response.read()
                assert response.status == 200 and not response.will_close
        finally:
            conn.close()
        assert [d.webhook_id for d in healthy.take()] == ["msg_a", "msg_b", "msg_c"]
        assert healthy.accepted == 1


def test_the_hanging_receiver_accepts_and_never_answers_until_it_stops() -> None:
    with receiver(hang=True) as hanging:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            post(hanging.url, "msg_a", b"{}", timeout=0.5)
        assert time.monotonic() - started >= 0.5
        parts = urllib.parse.urlsplit(hanging.url)
        held = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        held.request("POST", parts.path, body=b"{}")
        deadline = time.monotonic() + 5
        while hanging.accepted < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hanging.accepted == 2
        assert hanging.take() == []
    # Stopping closed the held connection: its sender learns at once, not after 10 s.
    started = time.monotonic()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        held.getresponse()
    assert time.monotonic() - started < 2
    held.close()


def test_deliveries_add_up_across_cells() -> None:
    first = Deliveries.of([Delivery("msg_a", "secret.read", 1.0)], undelivered=0)
    first.add(Deliveries.of([Delivery("msg_b", "secret.read", 3.0)] * 2, undelivered=1))
    assert first.count == 3 and first.duplicates == 1 and first.undelivered == 1
    assert first.latencies_ms == [1.0, 3.0, 3.0]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100 and percentile([7.0], 0.99) == 7
    assert math.isnan(percentile([], 0.5))
