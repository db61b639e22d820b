"""A batch of creates on MongoDB: one client-level bulkWrite where every server is 8.0 or
later and runs it, the two-command path otherwise, and the same documents (and refusals)
either way."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import bson
import pymongo
import pytest
from prometheus_client import REGISTRY
from pymongo import monitoring

import vault.stores.mongo.store as mongo_store
from tests.conftest import audit_record, id_of, read_back, stored_record
from vault.events import CREATED
from vault.records import IdempotentCreate, SealedSecret
from vault.stores.base import AuditWrite, IdempotentRepeat
from vault.stores.mongo import idempotency as mongo_idempotency
from vault.stores.mongo.store import MongoStore

WRITES = {"insert", "update", "delete", "bulkWrite"}


class Commands(monitoring.CommandListener):
    """The write commands clients send while ``seen`` is a list (registered once, for the
    clients made after this module is imported; idle outside these tests)."""

    seen: list[str] | None = None

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.seen is not None and event.command_name in WRITES:
            self.seen.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


COMMANDS = Commands()
monitoring.register(COMMANDS)


@pytest.fixture(params=["bulkWrite", "two commands"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which path creates take: the server (nx-27017) speaks 8.0, so the two-command path,
    a 7.0 server's, is taken by saying the server does not."""
    if request.param == "two commands":
        monkeypatch.setattr(mongo_store, "supports_bulk_write", lambda client: False)
    return str(request.param)


@pytest.fixture
def database(mongo_uri: str) -> Iterator[Any]:
    name = "c" + uuid.uuid4().hex[:16]
    with pymongo.MongoClient(mongo_uri) as client:
        yield client[name]


def insert_batches() -> float:
    value = REGISTRY.get_sample_value("vault_store_batch_size_count", {"operation": "insert"})
    return value or 0.0


def run_on_store(mongo_uri: str, database: Any, work: Any) -> None:
    """Run ``await work(store)`` on a store that writes created events, once the store has
    met the server (before that, the first batch takes the two-command path: nothing tells
    the store yet what the server speaks)."""

    async def main() -> None:
        store = MongoStore(
            mongo_uri, database.name, timeout=5, max_secret_bytes=1024, events=[CREATED]
        )
        await store.open()
        try:
            await store.ping()
            await work(store)
        finally:
            await store.close()

    asyncio.run(main())


async def commands_of(creates: Any) -> tuple[Any, list[str], float]:
    """What ``creates`` (an awaitable) gave, the write commands sent meanwhile, and the
    number of store calls (batches) they made."""
    COMMANDS.seen, before = [], insert_batches()
    try:
        return await creates, COMMANDS.seen, insert_batches() - before
    finally:
        COMMANDS.seen = None


def idempotent(record: SealedSecret, key: str | None = None) -> IdempotentCreate:
    now = dt.datetime.now(dt.UTC)
    key = key or uuid.uuid4().hex
    return IdempotentCreate(
        key=key,
        body_digest="d" * 64,
        answer=SealedSecret(key, "0123456789abcdef", b"n" * 12, b"answer"),
        record_key=record.record_key,
        created_at=now,
        expires_at=now + dt.timedelta(hours=1),
        state="pending",
    )


def ids(collection: Any, **query: Any) -> set[str]:
    return {str(doc["_id"]) for doc in collection.find(query, {"_id": 1})}


def test_a_batch_of_creates_writes_everything_in_one_command_on_8_0(
    mongo_uri: str, database: Any, path: str
) -> None:
    plain = [stored_record() for _ in range(3)]
    with_receipts = [stored_record(receipt_id=str(uuid.uuid4())) for _ in range(3)]
    keyed = [stored_record() for _ in range(3)]
    keys = [idempotent(r) for r in keyed]
    audits = [audit_record(f"r{k}") for k in range(9)]

    async def work(store: MongoStore) -> None:
        creates = [
            *(store.insert(r, a) for r, a in zip(plain, audits[:3], strict=True)),
            *(store.insert(r, a) for r, a in zip(with_receipts, audits[3:6], strict=True)),
            *(store.insert(r, a, None, i) for r, a, i in zip(keyed, audits[6:], keys, strict=True)),
        ]
        written, seen, batches = await commands_of(asyncio.gather(*creates))
        assert all(isinstance(w, AuditWrite) and w.error is None for w in written)
        if path == "bulkWrite":
            assert seen == ["bulkWrite"] * int(batches)  # each batch, one command
        else:
            assert "bulkWrite" not in seen and seen.count("insert") >= 2 * batches
        records = [*plain, *with_receipts, *keyed]
        found = await asyncio.gather(*(read_back(store, id_of(r)) for r in records))
        assert found == records

    run_on_store(mongo_uri, database, work)
    assert len(ids(database.secrets)) == 9
    assert ids(database.audit, status=200) and len(ids(database.audit)) == 9
    assert len(ids(database.receipts)) == 3
    assert len(ids(database.outbox, type=CREATED)) == 9
    assert ids(database.idempotency, state="done") == {k.key for k in keys}


def test_a_refused_secret_fails_alone_and_nothing_is_written_beside_it(
    mongo_uri: str, database: Any, path: str
) -> None:
    taken = stored_record()
    conflicting = stored_record(id_of(taken), receipt_id=str(uuid.uuid4()))
    others = [stored_record(receipt_id=str(uuid.uuid4())) for _ in range(4)]
    key = idempotent(conflicting)

    async def work(store: MongoStore) -> None:
        await store.insert(taken)
        results = await asyncio.gather(
            store.insert(others[0], audit_record("o0")),
            store.insert(others[1], audit_record("o1")),
            store.insert(conflicting, audit_record("refused"), None, key),
            store.insert(others[2], audit_record("o2")),
            store.insert(others[3], audit_record("o3")),
            return_exceptions=True,
        )
        assert isinstance(results[2], pymongo.errors.WriteError)
        assert all(isinstance(r, AuditWrite) and r.error is None for r in results[:2])
        assert all(isinstance(r, AuditWrite) and r.error is None for r in results[3:])
        assert await read_back(store, id_of(taken)) == taken
        assert await asyncio.gather(*(read_back(store, id_of(r)) for r in others)) == others

    run_on_store(mongo_uri, database, work)
    # No record of a success, no receipt, no event for the refused create; its key is
    # free again for a retry. Every batch mate has all of its own.
    assert {doc["request_id"] for doc in database.audit.find()} == {"o0", "o1", "o2", "o3"}
    assert len(ids(database.receipts)) == 4
    assert len(ids(database.outbox, type=CREATED)) == 5  # ``taken``'s and the four others'
    assert ids(database.idempotency) == set()


def test_an_audit_record_refused_alone_fails_only_its_own_create(
    mongo_uri: str, database: Any, path: str
) -> None:
    records = [stored_record() for _ in range(4)]
    database.audit.create_index("request_id", unique=True)
    database.audit.insert_one({"request_id": "reused"})

    async def work(store: MongoStore) -> None:
        names = ["a", "reused", "b", "c"]
        written = await asyncio.gather(
            *(store.insert(r, audit_record(n)) for r, n in zip(records, names, strict=True))
        )
        assert [isinstance(w, AuditWrite) and w.error is not None for w in written] == [
            False,
            True,
            False,
            False,
        ]
        # Every secret is stored: the refused record is the audit layer's to answer for.
        found = await asyncio.gather(*(read_back(store, id_of(r)) for r in records))
        assert found == records

    run_on_store(mongo_uri, database, work)
    assert sorted(doc["request_id"] for doc in database.audit.find()) == [
        "a",
        "b",
        "c",
        "reused",
    ]


def test_a_repeated_key_in_a_batch_writes_nothing_and_gets_the_first_answer(
    mongo_uri: str, database: Any, path: str
) -> None:
    first, repeat = stored_record(), stored_record()
    others = [stored_record() for _ in range(3)]
    key = idempotent(first)

    async def work(store: MongoStore) -> None:
        await store.insert(first, None, None, key)
        results = await asyncio.gather(
            store.insert(others[0], audit_record("o0")),
            store.insert(repeat, audit_record("repeat"), None, idempotent(repeat, key.key)),
            *(store.insert(r, audit_record(f"o{k}")) for k, r in enumerate(others[1:], 1)),
            return_exceptions=True,
        )
        assert isinstance(results[1], IdempotentRepeat)
        assert results[1].existing.record_key == first.record_key
        assert await read_back(store, id_of(repeat)) is None
        assert await asyncio.gather(*(read_back(store, id_of(r)) for r in others)) == others

    run_on_store(mongo_uri, database, work)
    assert "repeat" not in {doc["request_id"] for doc in database.audit.find()}
    assert ids(database.idempotency, state="done") == {key.key}


def test_a_key_already_stored_under_its_own_create_is_that_creates_claim(
    mongo_uri: str, database: Any, path: str
) -> None:
    """A claim that landed though its answer was lost (or came back as another error)
    is this create's own: the create goes on, where it would be told its own claim is a
    create in flight."""
    record = stored_record()
    key = idempotent(record)
    database.idempotency.insert_one(mongo_idempotency.pending_document(key))

    async def work(store: MongoStore) -> None:
        assert await store.insert(record, audit_record("own"), None, key)
        assert await read_back(store, id_of(record)) == record

    run_on_store(mongo_uri, database, work)
    assert ids(database.idempotency, state="done") == {key.key}
    assert "own" in {doc["request_id"] for doc in database.audit.find()}


OP_MSG = 2013
FCV_7_REFUSAL = {
    "ok": 0.0,
    "errmsg": "BulkWrite may not be run without featureFlagBulkWriteCommand enabled",
    "code": 115,
    "codeName": "CommandNotSupported",
}


def read_wire_message(sock: socket.socket) -> bytes | None:
    """One whole MongoDB wire message (its header says how long), or None at EOF."""
    data = b""
    while len(data) < 4 or len(data) < int.from_bytes(data[:4], "little"):
        wanted = int.from_bytes(data[:4], "little") if len(data) >= 4 else 4
        chunk = sock.recv(min(65536, wanted - len(data)))
        if not chunk:
            return None
        data += chunk
    return data


def command_name(message: bytes) -> str | None:
    """The command an OP_MSG carries: the first key of its body (its kind 0 section)."""
    if int.from_bytes(message[12:16], "little") != OP_MSG:
        return None
    pos = 20  # after the header and the flag bits
    while pos < len(message):
        kind, pos = message[pos], pos + 1
        size = int.from_bytes(message[pos : pos + 4], "little")
        if kind == 0:
            return message[pos + 5 : message.index(b"\0", pos + 5)].decode()
        pos += size
    return None


class BulkWriteRefusingProxy:
    """A MongoDB wire proxy on 127.0.0.1 in front of the test's server: while ``refuse``
    is set it answers each bulkWrite command itself, as MongoDB 8.0 does at
    featureCompatibilityVersion 7.0 (CommandNotSupported, nothing written); everything
    else, and every answer, it passes on as it is."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"mongodb://127.0.0.1:{self.listener.getsockname()[1]}/?directConnection=true"
        self.refuse = True
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.upstream)
            lock = threading.Lock()  # the client's socket: answers from both threads
            for pipe in (self._requests, self._answers):
                threading.Thread(target=pipe, args=(client, server, lock), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, lock: threading.Lock) -> None:
        with client, server:
            while (message := read_wire_message(client)) is not None:
                if not (self.refuse and command_name(message) == "bulkWrite"):
                    server.sendall(message)
                    continue
                self.refused += 1
                payload = b"\0\0\0\0" + b"\0" + bson.encode(FCV_7_REFUSAL)
                # Its header: length, its own id, the request's id (responseTo), opcode.
                head = struct.pack("<ii", 16 + len(payload), 1) + message[4:8]
                head += struct.pack("<i", OP_MSG)
                with lock:
                    client.sendall(head + payload)

    def _answers(self, client: socket.socket, server: socket.socket, lock: threading.Lock) -> None:
        try:
            while (message := read_wire_message(server)) is not None:
                with lock:
                    client.sendall(message)
        except OSError:  # the other thread closed both
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def refusing(mongo_uri: str) -> Iterator[BulkWriteRefusingProxy]:
    host, port = pymongo.uri_parser.parse_uri(mongo_uri)["nodelist"][0]
    proxy = BulkWriteRefusingProxy((host, port))
    yield proxy
    proxy.close()


def test_creates_take_two_commands_while_the_server_refuses_bulk_write_then_one_again(
    database: Any, refusing: BulkWriteRefusingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MongoDB 8.0 binaries at featureCompatibilityVersion 7.0 (the state an upgrade
    passes through) refuse bulkWrite: every create is still stored, with its receipt,
    key and audit record, and after the recheck the batches are one command again."""
    first = [stored_record(receipt_id=str(uuid.uuid4())) for _ in range(4)]
    keys = [idempotent(r) for r in first]
    later = [stored_record() for _ in range(3)]
    after = [stored_record() for _ in range(3)]

    async def work(store: MongoStore) -> None:
        creates = (
            store.insert(r, audit_record(f"f{k}"), None, i)
            for k, (r, i) in enumerate(zip(first, keys, strict=True))
        )
        written, seen, _ = await commands_of(asyncio.gather(*creates))
        assert all(isinstance(w, AuditWrite) and w.error is None for w in written)
        assert seen.count("bulkWrite") == 1 and refusing.refused == 1
        # Until the recheck, no batch asks again.
        written, seen, _ = await commands_of(
            asyncio.gather(*(store.insert(r, audit_record("later")) for r in later))
        )
        assert all(w.error is None for w in written) and "bulkWrite" not in seen
        # The featureCompatibilityVersion is raised; the recheck is due.
        refusing.refuse = False
        monkeypatch.setattr(mongo_store, "BULK_WRITE_RECHECK_SECONDS", 0)
        written, seen, batches = await commands_of(
            asyncio.gather(*(store.insert(r, audit_record("after")) for r in after))
        )
        assert all(w.error is None for w in written)
        assert seen == ["bulkWrite"] * int(batches) and refusing.refused == 1
        records = [*first, *later, *after]
        assert await asyncio.gather(*(read_back(store, id_of(r)) for r in records)) == records

    run_on_store(refusing.uri, database, work)
    assert len(ids(database.secrets)) == 10 and len(ids(database.audit, status=200)) == 10
    assert len(ids(database.receipts)) == 4
    assert ids(database.idempotency, state="done") == {k.key for k in keys}
