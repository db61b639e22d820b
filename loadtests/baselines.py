"""Reference apps the benchmark serves on the same Hypercorn as the service.

- ``echo``: a bare Starlette endpoint that answers the JSON it was sent: the floor of
  this stack (routing, JSON, Hypercorn), with no crypto, store or middleware.
- ``naive``: the straightforward implementation the service must beat on MongoDB: a
  synchronous endpoint (Starlette runs it in its thread pool) that seals the secret and
  does one insert for it and another for its audit record on every request, on the same
  store, with the same schema: expiry (``ttl_seconds``) kept the straightforward MongoDB
  way, by a TTL index on ``expires_at``, as the service's own collection has one.
- ``naive-sqlite``: the same on an embedded SQLite file at the service's durability: one
  ``sqlite3`` connection per thread of that pool, WAL, ``synchronous=FULL``, and each
  insert (the secret, then its audit record) committed on its own, as the MongoDB naive
  app's two inserts are each durable on their own. Expiry is a column checked on read.

Both naive apps fetch the same way: read the secret by id, answer 404 when it is missing
or expired, else open it, then insert the fetch's audit record; neither deletes nor
counts reads (no read limits). Run one: ``python -m loadtests.baselines echo --port 8001``
(``naive`` reads MONGO_URI, MONGO_DB and MASTER_KEY like the service does; ``naive-sqlite``
reads DATA_DIR, where it keeps ``naive.db``, and MASTER_KEY).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypercorn.config import Config
from hypercorn.run import run
from pymongo import MongoClient
from pymongo.write_concern import WriteConcern
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vault.crypto import Keyring, parse_key
from vault.records import SealedSecret


async def _echo(request: Request) -> Response:
    return JSONResponse(await request.json())


def echo_app() -> Starlette:
    """POST / (and the vault paths) answer the JSON body back."""
    paths = ["/", "/vault/secret/create", "/vault/secret/fetch", "/vault/secret/delete"]
    return Starlette(routes=[Route(path, _echo, methods=["POST"]) for path in paths])


SyncHandler = Callable[[Request, dict[str, Any]], Response]


def _threadpool_app(create_sync: SyncHandler, fetch_sync: SyncHandler) -> Starlette:
    """Create and fetch answered by synchronous handlers in Starlette's thread pool, as the
    straightforward implementation on either store does."""

    async def create(request: Request) -> Response:
        return await run_in_threadpool(create_sync, request, await request.json())

    async def fetch(request: Request) -> Response:
        return await run_in_threadpool(fetch_sync, request, await request.json())

    return Starlette(
        routes=[
            Route("/vault/secret/create", create, methods=["POST"]),
            Route("/vault/secret/fetch", fetch, methods=["POST"]),
        ]
    )


def naive_app() -> Starlette:
    """Create and fetch with two synchronous, unbatched writes per request.

    The writes run in Starlette's thread pool (so the event loop is not blocked, which
    would make the comparison unfair to the naive side); nothing is batched or grouped.
    """
    client: MongoClient[dict[str, Any]] = MongoClient(os.environ["MONGO_URI"], tz_aware=True)
    db = client[os.environ.get("MONGO_DB", "vault")]
    durable = WriteConcern(w="majority", j=True)
    secrets = db.get_collection("secrets", write_concern=durable)
    audit = db.get_collection("audit", write_concern=durable)
    # The service's collection has this index too; on nx-27017 every find on a collection
    # with a TTL index first deletes what expired, so both apps pay that alike. The bench's
    # "naive, no TTL index" (NAIVE_TTL_INDEX=0) shows reads on a server that does not.
    if os.environ.get("NAIVE_TTL_INDEX", "1") != "0":
        secrets.create_index("expires_at", expireAfterSeconds=0)
    keyring = Keyring(parse_key(os.environ["MASTER_KEY"]))

    def record(request: Request, op: str, status: int, secret_id: str) -> None:
        peer = request.client.host if request.client else "unknown"
        audit.insert_one(
            {"ts": dt.datetime.now(dt.UTC), "op": op, "status": status, "client_ip": peer,
             "secret_id": secret_id}
        )  # fmt: skip

    def create_sync(request: Request, body: dict[str, Any]) -> Response:
        secret_id = str(uuid.uuid4())
        sealed = keyring.seal(secret_id, base64.b64decode(body["secret"], validate=True))
        doc: dict[str, Any] = {
            "_id": secret_id,
            "kid": sealed.key_id,
            "nonce": sealed.nonce,
            "ct": sealed.ciphertext,
        }
        if "ttl_seconds" in body:
            doc["expires_at"] = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=body["ttl_seconds"])
        secrets.insert_one(doc)
        record(request, "create", 200, secret_id)
        return JSONResponse({"secret_id": secret_id})

    def fetch_sync(request: Request, body: dict[str, Any]) -> Response:
        secret_id = body["secret_id"]
        doc = secrets.find_one({"_id": secret_id})
        expires_at = None if doc is None else doc.get("expires_at")
        if expires_at is not None and expires_at <= dt.datetime.now(dt.UTC):
            doc = None
        if doc is None:
            record(request, "fetch", 404, secret_id)
            return JSONResponse({"detail": "not found"}, status_code=404)
        sealed = SealedSecret(secret_id, doc["kid"], bytes(doc["nonce"]), bytes(doc["ct"]))
        plaintext = keyring.open(sealed)
        record(request, "fetch", 200, secret_id)
        return JSONResponse({"secret": base64.b64encode(plaintext).decode()})

    return _threadpool_app(create_sync, fetch_sync)


NAIVE_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    id         TEXT PRIMARY KEY,
    kid        TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ct         BLOB NOT NULL,
    expires_at REAL  -- Unix seconds; NULL: never expires
);
CREATE TABLE IF NOT EXISTS audit (
    id        INTEGER PRIMARY KEY,
    ts        TEXT NOT NULL,
    op        TEXT NOT NULL,
    status    INTEGER NOT NULL,
    client_ip TEXT NOT NULL,
    secret_id TEXT NOT NULL
);
"""
# How long a connection waits for the write lock before it fails the request: far past any
# wait the bench causes, so the naive app answers every request however slowly.
NAIVE_SQLITE_BUSY_SECONDS = 30.0


def naive_sqlite_app() -> Starlette:
    """Create and fetch on SQLite with two synchronous, unbatched commits per create.

    The MongoDB naive app's shape on DATA_DIR/naive.db (a fresh file per bench cell): the
    same pool threads, each with its own connection; every commit durable before the
    answer (``synchronous=FULL``), so it pays the same fsyncs the service's store pays.
    """
    path = Path(os.environ.get("DATA_DIR", "./data")) / "naive.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as setup:
        setup.execute("PRAGMA journal_mode=WAL")  # a property of the file: every connection
        setup.executescript(NAIVE_SQLITE_SCHEMA)
    setup.close()
    keyring = Keyring(parse_key(os.environ["MASTER_KEY"]))
    local = threading.local()

    def connection() -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(path, timeout=NAIVE_SQLITE_BUSY_SECONDS)
            conn.execute("PRAGMA synchronous=FULL")  # per connection: durable commits
            local.conn = conn
        return conn

    def record(request: Request, op: str, status: int, secret_id: str) -> None:
        peer = request.client.host if request.client else "unknown"
        conn = connection()
        with conn:  # commits
            conn.execute(
                "INSERT INTO audit (ts, op, status, client_ip, secret_id) VALUES (?, ?, ?, ?, ?)",
                (dt.datetime.now(dt.UTC).isoformat(), op, status, peer, secret_id),
            )

    def create_sync(request: Request, body: dict[str, Any]) -> Response:
        secret_id = str(uuid.uuid4())
        sealed = keyring.seal(secret_id, base64.b64decode(body["secret"], validate=True))
        expires_at = None
        if "ttl_seconds" in body:
            expires_at = dt.datetime.now(dt.UTC).timestamp() + body["ttl_seconds"]
        conn = connection()
        with conn:  # commits
            conn.execute(
                "INSERT INTO secrets (id, kid, nonce, ct, expires_at) VALUES (?, ?, ?, ?, ?)",
                (secret_id, sealed.key_id, sealed.nonce, sealed.ciphertext, expires_at),
            )
        record(request, "create", 200, secret_id)
        return JSONResponse({"secret_id": secret_id})

    def fetch_sync(request: Request, body: dict[str, Any]) -> Response:
        secret_id = body["secret_id"]
        row = (
            connection()
            .execute("SELECT kid, nonce, ct, expires_at FROM secrets WHERE id = ?", (secret_id,))
            .fetchone()
        )
        if row is not None and row[3] is not None and row[3] <= dt.datetime.now(dt.UTC).timestamp():
            row = None
        if row is None:
            record(request, "fetch", 404, secret_id)
            return JSONResponse({"detail": "not found"}, status_code=404)
        plaintext = keyring.open(SealedSecret(secret_id, row[0], bytes(row[1]), bytes(row[2])))
        record(request, "fetch", 200, secret_id)
        return JSONResponse({"secret": base64.b64encode(plaintext).decode()})

    return _threadpool_app(create_sync, fetch_sync)


APPS = {"echo": "echo_app", "naive": "naive_app", "naive-sqlite": "naive_sqlite_app"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", choices=sorted(APPS))
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.application_path = f"loadtests.baselines:{APPS[args.app]}()"
    config.workers = 0  # one worker in this process, as `secret-manager serve` runs it
    config.include_server_header = False
    config.accesslog = None
    return run(config)


if __name__ == "__main__":
    raise SystemExit(main())
