"""Lifecycle events made by real requests on real servers, delivered to a real receiver on
127.0.0.1 and verified with the reference implementation of Standard Webhooks: every
event type, once each across replicas and workers, and a read acknowledged just before a
SIGKILL still reported after the restart."""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import ServerProcess, b64
from tests.webhook_receiver import Receiver, verified
from vault.events import CREATED, DELETED, DENIED, EVENT_TYPES, EXPIRED, READ, USED_UP

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
TOKENS = {"acme/ci": "ci-" + "c" * 40, "beta/ci": "beta-" + "b" * 40}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def hooked(env: dict[str, str], receiver: Receiver, tmp_path: Path, **extra: str) -> dict[str, str]:
    keys = tmp_path / "keys"
    keys.write_text("".join(f"{name}:{token}\n" for name, token in TOKENS.items()))
    return {
        **env,
        "WEBHOOK_URLS": receiver.url,
        "WEBHOOK_SECRET": SECRET,
        "API_KEYS_FILE": str(keys),
        "RATE_LIMIT": "off",
        **extra,
    }


def post(server: ServerProcess, op: str, body: dict[str, Any], key: str = "acme/ci") -> Any:
    answer = httpx.post(
        f"{server.url}/vault/secret/{op}",
        json=body,
        headers={"Authorization": f"Bearer {TOKENS[key]}"},
        timeout=10,
    )
    return answer


def payloads(receiver: Receiver) -> list[dict[str, Any]]:
    """Every acknowledged delivery's payload, each verified as a receiver verifies it."""
    found = []
    for delivery in receiver.acknowledged():
        payload = verified(SECRET, delivery)
        assert isinstance(payload, dict)
        assert payload == json.loads(delivery.body)
        found.append(payload)
    return found


def test_every_event_type_arrives_signed_with_what_a_receiver_may_know(
    start_server: Callable[..., ServerProcess],
    store_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    server = start_server(hooked(store_env, receiver, tmp_path, SECRET_PURGE_INTERVAL_SECONDS="1"))
    one_time = post(
        server,
        "create",
        {"secret": b64(b"s3cret"), "max_reads": 1, "receipt": True, "label": "for bob"},
    ).json()
    read_body = {"secret_id": one_time["secret_id"]}
    assert post(server, "fetch", read_body, "beta/ci").status_code == 404  # denied
    assert post(server, "fetch", read_body).status_code == 200  # read, used up
    deleted = post(server, "create", {"secret": b64(b"s3cret")}).json()
    assert post(server, "delete", deleted).status_code == 200
    post(server, "create", {"secret": b64(b"s3cret"), "ttl_seconds": 1})  # expires
    receiver.wait_for(
        lambda r: {p["type"] for p in payloads(r)} == set(EVENT_TYPES), 20, "every event type"
    )
    seen = payloads(receiver)
    assert Counter(p["type"] for p in seen) == {
        CREATED: 3,
        DENIED: 1,
        READ: 1,
        USED_UP: 1,
        DELETED: 1,
        EXPIRED: 1,
    }
    by_type = {p["type"]: p for p in seen}
    read = by_type[READ]["data"]
    assert read["receipt_id"] == one_time["receipt_id"]
    assert read["label"] == "for bob"
    assert (read["tenant"], read["key_name"], read["key_tenant"]) == ("acme", "ci", "acme")
    assert read["client_ip"] == "127.0.0.1"
    assert read["reads_left"] == 0 and len(read["secret_id_hmac"]) == 64
    denied = by_type[DENIED]["data"]
    assert (denied["tenant"], denied["key_tenant"]) == ("acme", "beta")
    assert by_type[EXPIRED]["data"]["key_name"] is None  # found by the purge
    # Never a secret, never a secret id in clear, in any body.
    bodies = b"".join(d.body for d in receiver.snapshot())
    for secret_id in (one_time["secret_id"], deleted["secret_id"]):
        assert secret_id.encode() not in bodies
    assert b64(b"s3cret").encode() not in bodies and b"s3cret" not in bodies
    # One delivery per event: a healthy receiver is never sent one twice.
    ids = [d.id for d in receiver.snapshot()]
    assert len(ids) == len(set(ids)) == len(seen)


def _traffic(servers: list[ServerProcess], rounds: int) -> int:
    """Creates, reads and deletes spread over ``servers``; the number of events made."""
    made = 0
    for k in range(rounds):
        server = servers[k % len(servers)]
        created = post(server, "create", {"secret": b64(b"x"), "max_reads": 2}).json()
        body = {"secret_id": created["secret_id"]}
        assert post(servers[(k + 1) % len(servers)], "fetch", body).status_code == 200
        assert post(server, "delete", body).status_code == 200
        made += 3  # created, read, deleted
    return made


def test_replicas_and_workers_deliver_each_event_once(
    start_server: Callable[..., ServerProcess],
    mongo_uri: str,
    master_key: str,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    env = {"MASTER_KEY": master_key, "MONGO_URI": mongo_uri, "MONGO_DB": "t" + uuid.uuid4().hex}
    env = hooked(env, receiver, tmp_path)
    servers = [
        start_server({**env, "DATA_DIR": str(tmp_path / "a")}),
        start_server({**env, "DATA_DIR": str(tmp_path / "b")}, "--workers", "2"),
    ]
    made = _traffic(servers, 20)
    receiver.wait_for(lambda r: len(r.acknowledged_ids()) == made, 30, "every event")
    time.sleep(1.5)  # anything sent twice would arrive meanwhile
    ids = [d.id for d in receiver.snapshot()]
    duplicates = len(ids) - len(set(ids))
    assert duplicates == 0, Counter(ids).most_common(3)
    assert Counter(p["type"] for p in payloads(receiver)) == {CREATED: 20, READ: 20, DELETED: 20}


def test_a_read_acknowledged_before_a_sigkill_is_reported_after_the_restart(
    start_server: Callable[..., ServerProcess],
    store_env: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    receiver.stop()  # down: the events wait in the outbox
    env = hooked(store_env, receiver, tmp_path)
    first = start_server(env)
    created = post(first, "create", {"secret": b64(b"x"), "receipt": True}).json()
    fetched = post(first, "fetch", {"secret_id": created["secret_id"]})
    assert fetched.status_code == 200  # acknowledged
    first.process.kill()
    first.process.wait()
    receiver.start()
    start_server(env)
    receiver.wait_for(
        lambda r: {p["type"] for p in payloads(r)} == {CREATED, READ}, 30, "the read's event"
    )
    read = next(p for p in payloads(receiver) if p["type"] == READ)
    assert read["data"]["receipt_id"] == created["receipt_id"]
