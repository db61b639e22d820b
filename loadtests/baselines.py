"""Two reference apps the benchmark serves on the same Hypercorn as the service.

- ``echo``: a bare Starlette endpoint that answers the JSON it was sent: the floor of
  this stack (routing, JSON, Hypercorn), with no crypto, store or middleware.
- ``naive``: the straightforward implementation the service must beat: a synchronous
  endpoint (Starlette runs it in its thread pool) that seals the secret and does one
  insert for it and another for its audit record on every request, on the same store,
  with the same schema: expiry (``ttl_seconds``) kept the straightforward MongoDB way, by
  a TTL index on ``expires_at``, as the service's own collection has one.

Run one: ``python -m loadtests.baselines echo --port 8001`` (``naive`` reads MONGO_URI,
MONGO_DB and MASTER_KEY like the service does).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import uuid
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", choices=["echo", "naive"])
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.application_path = f"loadtests.baselines:{args.app}_app()"
    config.workers = 0  # one worker in this process, as `secret-manager serve` runs it
    config.include_server_header = False
    config.accesslog = None
    return run(config)


if __name__ == "__main__":
    raise SystemExit(main())
