"""Secret ids at rest only as digests (issue #23), end to end on both stores.

A secret id is a bearer token: whoever has one fetches the secret through the API. So
nothing the service writes may hold one: not a record, an index, SQLite's write-ahead log,
an audit record, an export or a log line. These tests dump everything the stores hold
after real traffic through a real server and look for every id it handed out.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import bson
import httpx2 as httpx
import pymongo

from loadtests.processes import free_port
from tests.conftest import ServerProcess, b64, clean_env, keys_of, write_legacy
from vault.crypto import Keyring, parse_key
from vault.records import SealedSecret, record_key


def forms(secret_id: str) -> list[bytes]:
    """Every spelling of an id worth looking for in raw bytes: its text (as handed out,
    upper-case, without dashes) and the UUID's 16 bytes."""
    parsed = uuid.UUID(secret_id)
    return [
        secret_id.encode(),
        secret_id.upper().encode(),
        parsed.hex.encode(),
        parsed.bytes,
    ]


def dump(env: dict[str, str]) -> bytes:
    """Everything the store ``env`` names holds: every table and its rows, or every
    collection with its documents and indexes, and for SQLite the bytes of the database
    file, its write-ahead log and shared memory as they are on disk."""
    if "MONGO_URI" in env:
        parts = []
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            database = client[env["MONGO_DB"]]
            for name in database.list_collection_names():
                collection = database[name]
                parts.append(repr(collection.index_information()).encode())
                for doc in collection.find({}):
                    parts += [bson.encode(doc), repr(doc).encode()]
        return b"".join(parts)
    data_dir = Path(env["DATA_DIR"])
    parts = [path.read_bytes() for path in sorted(data_dir.glob("vault.db*"))]
    with closing(sqlite3.connect(data_dir / "vault.db")) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
        parts.append(repr(tables).encode())
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            parts.append(repr(conn.execute(f'SELECT * FROM "{table}"').fetchall()).encode())  # noqa: S608
    return b"".join(parts)


def stored_keys(env: dict[str, str]) -> set[str]:
    """The key every secret record is stored under."""
    if "MONGO_URI" in env:
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            return {str(doc["_id"]) for doc in client[env["MONGO_DB"]]["secrets"].find({})}
    with closing(sqlite3.connect(Path(env["DATA_DIR"]) / "vault.db")) as conn:
        return {row[0] for row in conn.execute("SELECT record_key FROM secrets")}


def assert_no_id_in(data: bytes, secret_ids: list[str], where: str) -> None:
    found = [secret_id for secret_id in secret_ids if any(f in data for f in forms(secret_id))]
    assert not found, f"{len(found)} of {len(secret_ids)} secret ids found in {where}"


def fetch(client: httpx.Client, secret_id: str) -> httpx.Response:
    return client.post("/vault/secret/fetch", json={"secret_id": secret_id})


def test_nothing_the_service_writes_holds_a_secret_id(
    start_server: Callable[..., ServerProcess], store_env: dict[str, str]
) -> None:
    # Everything on: audit records mirrored to the log, the most verbose log level, and
    # webhooks to a receiver that never answers, so every event stays in the outbox.
    server = start_server(
        {
            **store_env,
            "LOG_LEVEL": "DEBUG",
            "AUDIT_STDOUT": "true",
            "RATE_LIMIT": "off",
            "WEBHOOK_URLS": f"http://127.0.0.1:{free_port()}/hooks",
            "WEBHOOK_SECRET": "whsec_" + base64.b64encode(os.urandom(32)).decode(),
        }
    )
    made: dict[str, bytes] = {}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for n in range(24):
            plaintext = os.urandom(16)
            fields: dict[str, Any] = [{}, {"ttl_seconds": 3600}, {"max_reads": 3}][n % 3]
            if n % 8 == 7:
                fields = {"max_reads": 1}
            if n % 4 == 0:  # a receipt: its id is in the record, the secret's is not
                fields = {**fields, "receipt": True, "label": f"label {n}"}
            # Half of them idempotent: the stored answer names the secret id, sealed.
            headers = {"Idempotency-Key": f"create-{n}"} if n % 2 == 0 else {}
            answer = client.post(
                "/vault/secret/create", json={"secret": b64(plaintext), **fields}, headers=headers
            )
            assert answer.status_code == 200, answer.text
            made[answer.json()["secret_id"]] = plaintext
        ids = list(made)
        for secret_id in ids:  # a read of each: the one-time secrets are used up
            assert fetch(client, secret_id).status_code == 200
        used_up = [i for n, i in enumerate(ids) if n % 8 == 7]
        deleted = [i for i in ids[::5] if i not in used_up]
        for secret_id in deleted:
            assert client.post("/vault/secret/delete", json={"secret_id": secret_id}).json() == {
                "secret_id": secret_id,
                "deleted": True,
            }
        unknown = [str(uuid.uuid4()) for _ in range(3)]  # never issued: looked up, answered 404
        for secret_id in [*deleted, *unknown]:
            assert fetch(client, secret_id).status_code == 404
        live = [i for i in ids if i not in deleted and i not in used_up]
        assert used_up and live

        # Below the service: every table and collection, the SQLite file and its WAL.
        held = dump(store_env)
        assert_no_id_in(held, [*ids, *unknown], "the store")
        # It did look where they would be: the events waiting in the outbox, and the
        # idempotent creates' sealed answers.
        assert b"secret.created" in held and b"secret.deleted" in held
        assert b"create-0" not in held  # an Idempotency-Key is stored as its digest
        assert stored_keys(store_env) == keys_of(*live)
        assert all(record_key(i).encode() in held for i in live)  # the dump holds them all
        # What the store does hold fetches nothing: a record key is no secret id.
        for key in sorted(stored_keys(store_env))[:3]:
            refused = fetch(client, key)
            assert refused.status_code == 400, refused.text
        # Every live secret still fetches by its id.
        for secret_id in live:
            answer = fetch(client, secret_id)
            assert answer.status_code == 200
            assert base64.b64decode(answer.json()["secret"]) == made[secret_id]

    assert server.stop() == 0
    assert_no_id_in(dump(store_env), [*ids, *unknown], "the store after a clean stop")
    log = server.output()
    assert '"secret_id_hmac"' in log  # the audit records, mirrored: named by an HMAC only
    assert_no_id_in(log.encode(), [*ids, *unknown], "the server's log")


def run(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "vault", *args],
        env=clean_env(**env),
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_a_store_an_earlier_version_wrote_is_served_converted_and_carried_without_ids(
    start_server: Callable[..., ServerProcess],
    store_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # Written below the service as the previous version wrote it: each record under its
    # id, sealed with the id in its associated data (SQLite: its schema; MongoDB: v 1).
    keyring = Keyring(parse_key(store_env["MASTER_KEY"]))
    made = {str(uuid.uuid4()): os.urandom(16) for _ in range(6)}
    records: list[SealedSecret] = [keyring.seal(i, data) for i, data in made.items()]
    write_legacy(store_env, records)
    ids = list(made)
    held = dump(store_env)  # the search finds ids where they are: here, every one
    assert all(secret_id.encode() in held for secret_id in ids)

    server = start_server(store_env)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for secret_id in ids:  # served as they are
            assert fetch(client, secret_id).json()["secret"] == b64(made[secret_id])
        gone = ids.pop()
        assert client.post("/vault/secret/delete", json={"secret_id": gone}).status_code == 200
        assert fetch(client, gone).status_code == 404
        new = client.post("/vault/secret/create", json={"secret": b64(b"new")}).json()
        made[new["secret_id"]] = b"new"
        ids.append(new["secret_id"])

        # An export would write the ids in clear: refused until converted.
        no_store = {k: v for k, v in store_env.items() if k != "MASTER_KEY"}
        refused = run(no_store, "export")
        assert refused.returncode == 2 and refused.stdout == b""
        assert b"run secret-manager rewrap first" in refused.stderr

        converted = run(store_env, "rewrap")  # beside the running server
        assert converted.returncode == 0, converted.stdout + converted.stderr
        assert re.search(rb"^  remaining keyed by id +0$", converted.stdout, re.MULTILINE)
        assert_no_id_in(converted.stdout + converted.stderr, [*ids, gone], "rewrap's output")
        assert stored_keys(store_env) == keys_of(*ids)
        assert_no_id_in(dump(store_env), [*ids, gone], "the converted store")
        for secret_id in ids:  # still served, by the same server, under the record keys
            assert fetch(client, secret_id).json()["secret"] == b64(made[secret_id])

        exported = run(no_store, "export", "--audit")
        assert exported.returncode == 0, exported.stderr
    assert server.stop() == 0
    assert_no_id_in(exported.stdout, [*ids, gone], "the export")
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert {line["record_key"] for line in lines if line.get("type") == "secret"} == {
        record_key(i) for i in ids
    }

    target = {"DATA_DIR": str(tmp_path / "elsewhere")}
    imported = run(target, "import", stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    assert_no_id_in(dump(target), [*ids, gone], "the store imported into")
    elsewhere = start_server({**target, "MASTER_KEY": store_env["MASTER_KEY"]})
    with httpx.Client(base_url=elsewhere.url, timeout=10) as client:
        for secret_id in ids:
            assert fetch(client, secret_id).json()["secret"] == b64(made[secret_id])
        assert fetch(client, gone).status_code == 404
