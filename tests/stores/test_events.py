"""Lifecycle events, as both stores write them in the store call of the change: a create,
a read and the read that uses a secret up, a refusal, a delete, and an expiry found by the
purge, each with what its receiver may know (never the secret, never its id)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vault.crypto import Keyring
from vault.events import (
    CREATED,
    DELETED,
    DENIED,
    EVENT_TYPES,
    EXPIRED,
    READ,
    USED_UP,
    Actor,
    PendingEvent,
)
from vault.lifecycle import Caller
from vault.records import SealedSecret, record_key
from vault.stores.base import DeleteResult, SecretStore
from vault.stores.mongo.store import MongoStore
from vault.stores.sqlite.connection import create_file
from vault.stores.sqlite.store import SQLiteStore

KEYRING = Keyring(b"e" * 32)
ACTOR = Actor(key_name="ci", tenant="acme", client_ip="10.1.2.3", secret_id_hmac="ab" * 32)


def make_store(kind: str, tmp_path: Path, mongo_uri: str | None, types: Any) -> SecretStore:
    if kind == "sqlite":
        path = tmp_path / "vault.db"
        create_file(path)
        return SQLiteStore(path, timeout=5, max_secret_bytes=1024, events=types)
    assert mongo_uri is not None
    db = "t" + uuid.uuid4().hex[:16]
    return MongoStore(mongo_uri, db, timeout=5, max_secret_bytes=1024, events=types)


@pytest.fixture
def store(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    uri = request.getfixturevalue("mongo_uri") if store_kind == "mongo" else None
    made = make_store(store_kind, tmp_path, uri, EVENT_TYPES)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(made.open())
    yield made, loop
    loop.run_until_complete(made.close())
    loop.close()


def sealed(secret_id: str, **fields: Any) -> SealedSecret:
    record = KEYRING.seal(record_key(secret_id), b"payload", tenant="acme")
    return SealedSecret(**{**record.__dict__, **fields})


def drain(store: SecretStore, loop: asyncio.AbstractEventLoop) -> list[PendingEvent]:
    """Every event in the outbox, oldest first, claimed (and so not claimed again)."""
    far = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    claimed = loop.run_until_complete(store.claim_events("test", far, 60, 100))
    # One change may make two events at one time (the last read: read, then used up).
    return sorted(claimed, key=lambda p: (p.event.at, EVENT_TYPES.index(p.event.type)))


def test_each_change_writes_its_event_with_what_a_receiver_may_know(store: Any) -> None:
    store, loop = store
    run = loop.run_until_complete
    secret_id = str(uuid.uuid4())
    receipt_id = str(uuid.uuid4())
    record = sealed(secret_id, reads_left=2, receipt_id=receipt_id, label="for billing")
    run(store.insert(record, None, ACTOR))
    for _ in range(2):
        fetched, _ = run(store.fetch(secret_id, KEYRING, None, Caller("acme", "ci"), ACTOR))
        assert fetched.plaintext == b"payload"
    types = [p.event.type for p in drain(store, loop)]
    assert types == [CREATED, READ, READ, USED_UP]

    other = str(uuid.uuid4())
    run(store.insert(sealed(other, label="plain"), None, ACTOR))
    stranger = Actor(key_name="ci", tenant="beta", client_ip="10.9.9.9")
    refused, _ = run(store.fetch(other, KEYRING, None, Caller("beta", "ci"), stranger))
    assert refused.denied is not None
    assert run(store.delete(other, Caller("beta", "ci"), stranger)) is DeleteResult.DENIED_TENANT
    assert run(store.delete(other, Caller("acme", "ci"), ACTOR)) is DeleteResult.DELETED
    events = drain(store, loop)
    assert [p.event.type for p in events] == [CREATED, DENIED, DENIED, DELETED]
    denied = events[1].event.data
    assert denied == {
        "receipt_id": None,
        "label": "plain",
        "secret_id_hmac": None,
        "tenant": "acme",  # the secret's
        "key_name": "ci",
        "key_tenant": "beta",  # who was refused
        "client_ip": "10.9.9.9",
        "reads_left": None,
        "expires_at": None,
    }
    for pending in events:  # never an id in clear, never the secret
        assert secret_id not in pending.body and other not in pending.body
        assert "payload" not in pending.body


def test_the_purge_writes_one_expiry_event_per_secret(store: Any) -> None:
    store, loop = store
    run = loop.run_until_complete
    expires = dt.datetime.fromtimestamp(int(time.time()) + 1, dt.UTC)
    receipt_id = str(uuid.uuid4())
    run(store.insert(sealed(str(uuid.uuid4()), expires_at=expires, receipt_id=receipt_id)))
    drain(store, loop)  # its created event
    time.sleep(max(0.0, expires.timestamp() - time.time()) + 0.1)
    assert run(store.purge_expired()) == 1
    assert run(store.purge_expired()) == 0  # gone: no second event
    (expired,) = drain(store, loop)
    assert expired.event.type == EXPIRED
    assert expired.event.at == expires
    assert expired.event.data["receipt_id"] == receipt_id
    assert expired.event.data["key_name"] is None  # nobody made this change


def test_no_event_is_written_when_none_is_wanted(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri = request.getfixturevalue("mongo_uri") if store_kind == "mongo" else None
    quiet = make_store(store_kind, tmp_path, uri, ())
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    run(quiet.open())
    try:
        secret_id = str(uuid.uuid4())
        run(quiet.insert(sealed(secret_id), None, ACTOR))
        run(quiet.fetch(secret_id, KEYRING, None, Caller("acme", "ci"), ACTOR))
        run(quiet.delete(secret_id, Caller("acme", "ci"), ACTOR))
        assert drain(quiet, loop) == []
    finally:
        run(quiet.close())
        loop.close()
