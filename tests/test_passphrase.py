"""Passphrases: a secret made with one is read only with it; a wrong or missing one is
refused (403) without spending a read, wrong tries are counted exactly across replicas and
workers and delete the secret at the limit, and the passphrase is never stored nor logged.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pymongo
import pytest
from starlette.testclient import TestClient

from tests.conftest import RawRecords, ServerProcess, b64, wait_until
from tests.observability.test_metrics import sample
from tests.test_audit import audit_records
from tests.test_webhook_events import SECRET as WEBHOOK_SECRET
from tests.test_webhook_events import payloads
from tests.webhook_receiver import Receiver
from vault.crypto import (
    NONCE_BYTES,
    SCRYPT_KDF,
    Keyring,
    derive_passphrase_key,
    parse_key,
    unlock,
)
from vault.errors import DecryptionFailed
from vault.events import DELETED, DENIED
from vault.records import record_key

PASSPHRASE = "correct horse battery staple"
PLAINTEXT = b"deploy-token-8b1f"
NEEDED = 'this secret is protected by a passphrase: send it as "passphrase" in the fetch body'


def create(client: TestClient | httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"secret": b64(PLAINTEXT), "passphrase": PASSPHRASE, **fields}
    answer = client.post("/vault/secret/create", json=body)
    assert answer.status_code == 200, answer.text
    made: dict[str, Any] = answer.json()
    return made


def fetch(client: TestClient | httpx.Client, secret_id: str, **fields: Any) -> httpx.Response:
    return client.post("/vault/secret/fetch", json={"secret_id": secret_id, **fields})


def status(client: TestClient | httpx.Client, receipt_id: str) -> dict[str, Any]:
    answer = client.post("/vault/secret/status", json={"receipt_id": receipt_id})
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def wrong(tries_left: int) -> str:
    if tries_left == 0:
        return "the passphrase is wrong, and that was the last try allowed: the secret is deleted"
    tries = "try" if tries_left == 1 else "tries"
    return f"the passphrase is wrong; after {tries_left} more wrong {tries} the secret is deleted"


def test_the_right_passphrase_opens_a_wrong_or_missing_one_is_refused_and_spends_no_read(
    client: TestClient,
) -> None:
    made = create(client, max_reads=2, receipt=True)
    assert set(made) == {"secret_id", "reads_left", "receipt_id"}  # nothing new in the answer
    secret_id = made["secret_id"]

    missing = fetch(client, secret_id)
    assert (missing.status_code, missing.json()) == (403, {"detail": NEEDED})
    refused = fetch(client, secret_id, passphrase="Correct horse battery staple")
    assert (refused.status_code, refused.json()) == (403, {"detail": wrong(4)})
    # A missing passphrase is no guess: only the wrong one counted.
    assert status(client, made["receipt_id"])["passphrase_failures"] == 1

    opened = fetch(client, secret_id, passphrase=PASSPHRASE)
    assert opened.status_code == 200, opened.text
    # Neither refusal took a read: two were allowed, this is the first.
    assert opened.json() == {"secret": b64(PLAINTEXT), "reads_left": 1}
    assert fetch(client, secret_id, passphrase=PASSPHRASE).json()["reads_left"] == 0
    assert fetch(client, secret_id, passphrase=PASSPHRASE).status_code == 404


def test_the_limit_of_wrong_tries_deletes_the_secret(
    make_client: Callable[..., TestClient], raw_records: RawRecords
) -> None:
    client = make_client(PASSPHRASE_MAX_ATTEMPTS="3")
    denied, deleted = counted(client)
    made = create(client, receipt=True, label="for ops")
    secret_id = made["secret_id"]
    for tries_left in (2, 1):
        answer = fetch(client, secret_id, passphrase=f"guess {tries_left}")
        assert (answer.status_code, answer.json()) == (403, {"detail": wrong(tries_left)})
    # Still there, and the right passphrase still opens it (a wrong try never burns it).
    assert fetch(client, secret_id, passphrase=PASSPHRASE).status_code == 200
    last = fetch(client, secret_id, passphrase="guess 0")
    assert (last.status_code, last.json()) == (403, {"detail": wrong(0)})

    assert record_key(secret_id) not in raw_records.record_keys()  # deleted, not flagged
    gone = fetch(client, secret_id, passphrase=PASSPHRASE)
    unknown = fetch(client, str(uuid.uuid4()), passphrase=PASSPHRASE)
    assert gone.status_code == 404
    assert gone.json() == unknown.json()
    receipt = status(client, made["receipt_id"])
    assert receipt["state"] == "deleted"
    assert receipt["passphrase_failures"] == 3
    assert receipt["reads"] == 1
    assert counted(client) == (denied + 3, deleted + 1)


def counted(client: TestClient) -> tuple[float, float]:
    """The passphrase refusals and the deletions they made, as /metrics counts them."""
    exposition = client.get("/metrics").text
    denied = sample(exposition, "vault_access_denied_total", op="fetch", reason="passphrase")
    deleted = sample(exposition, "vault_secrets_deleted_total", reason="passphrase")
    return denied or 0.0, deleted or 0.0


def test_a_secret_without_a_passphrase_answers_as_before(client: TestClient) -> None:
    plain = client.post("/vault/secret/create", json={"secret": b64(b"plain"), "receipt": True})
    secret_id = plain.json()["secret_id"]
    # A passphrase sent for a secret that has none is not looked at.
    answer = fetch(client, secret_id, passphrase="anything at all")
    assert (answer.status_code, answer.json()) == (200, {"secret": b64(b"plain")})
    assert "passphrase_failures" not in status(client, plain.json()["receipt_id"])


@pytest.mark.parametrize("value", ["", "x" * 1025, 5, None, ["a"], {"a": 1}])
def test_a_malformed_passphrase_is_refused_and_changes_nothing(
    client: TestClient, raw_records: RawRecords, value: Any
) -> None:
    detail = "field 'passphrase' must be a string of 1 to 1024 characters, or left out"
    before = raw_records.record_keys()
    answer = client.post("/vault/secret/create", json={"secret": b64(b"x"), "passphrase": value})
    assert (answer.status_code, answer.json()) == (400, {"detail": detail})
    assert raw_records.record_keys() == before
    secret_id = create(client)["secret_id"]
    refused = fetch(client, secret_id, passphrase=value)
    assert (refused.status_code, refused.json()) == (400, {"detail": detail})
    # Not a try: the limit is still whole.
    assert fetch(client, secret_id, passphrase="nope").json() == {"detail": wrong(4)}


def test_passphrases_of_1024_characters_and_any_script_open(client: TestClient) -> None:
    for passphrase in ("é" * 1024, "パスワード 🔑", "x"):
        secret_id = create(client, passphrase=passphrase)["secret_id"]
        assert fetch(client, secret_id, passphrase=passphrase).status_code == 200
    # NFC: the same words typed as a precomposed or a decomposed é are one passphrase.
    secret_id = create(client, passphrase="caf\u00e9")["secret_id"]
    assert fetch(client, secret_id, passphrase="cafe\u0301").status_code == 200


def test_neither_the_database_nor_the_master_key_alone_opens_it(
    client: TestClient, raw_records: RawRecords, store_env: dict[str, str]
) -> None:
    secret_id = create(client)["secret_id"]
    stored = raw_records.dump()
    assert PLAINTEXT not in stored
    assert PASSPHRASE.encode() not in stored
    # What the master key opens is the passphrase layer: ciphertext, not the secret.
    sealed = raw_records.sealed(secret_id)
    assert sealed is not None
    keyring = Keyring(parse_key(store_env["MASTER_KEY"]))
    with pytest.raises(DecryptionFailed):  # the passphrase marker is bound to the record
        keyring.open(sealed)
    layer = keyring.open(dataclasses.replace(sealed, kdf=SCRYPT_KDF))
    assert PLAINTEXT not in layer
    assert len(layer) == NONCE_BYTES + len(PLAINTEXT) + 16  # nonce and tag of the inner layer
    assert unlock(derive_passphrase_key("not it", secret_id), layer) is None
    assert unlock(derive_passphrase_key(PASSPHRASE, secret_id), layer) == PLAINTEXT


def test_the_passphrase_is_in_no_audit_record_and_refusals_are_audited_denied(
    client: TestClient, store_env: dict[str, str]
) -> None:
    secret_id = create(client)["secret_id"]
    fetch(client, secret_id)
    fetch(client, secret_id, passphrase="a wrong guess")
    fetch(client, secret_id, passphrase=PASSPHRASE)
    records = [r for r in audit_records(store_env) if r["op"] == "fetch"]
    assert [(r["status"], r["outcome"]) for r in records] == [
        (403, "denied"),
        (403, "denied"),
        (200, "success"),
    ]
    text = json.dumps(audit_records(store_env), default=str)
    assert PASSPHRASE not in text
    assert "a wrong guess" not in text


def test_an_idempotent_create_keeps_only_a_keyed_digest_of_its_body(
    client: TestClient, store_env: dict[str, str]
) -> None:
    headers = {"Idempotency-Key": "create-with-passphrase-1"}
    body = {"secret": b64(PLAINTEXT), "passphrase": PASSPHRASE}
    first = client.post("/vault/secret/create", json=body, headers=headers)
    again = client.post("/vault/secret/create", json=body, headers=headers)
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    other = client.post(
        "/vault/secret/create", json={**body, "passphrase": "another"}, headers=headers
    )
    assert other.status_code == 422
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    bare = hashlib.sha256(canonical).hexdigest()
    digests = idempotency_digests(store_env)
    assert len(digests) == 1
    kid, _, mac = digests[0].partition(":")
    assert kid == Keyring(parse_key(store_env["MASTER_KEY"])).active_key_id
    assert len(mac) == 64
    assert bare not in digests[0]


def idempotency_digests(store_env: dict[str, str]) -> list[str]:
    if "MONGO_URI" in store_env:
        with pymongo.MongoClient(store_env["MONGO_URI"]) as mongo:
            docs = mongo[store_env["MONGO_DB"]]["idempotency"].find({})
            return [str(doc["body_digest"]) for doc in docs]
    with sqlite3.connect(Path(store_env["DATA_DIR"]) / "vault.db") as conn:
        return [row[0] for row in conn.execute("SELECT body_digest FROM idempotency")]


def race_wrong_guesses(urls: list[str], secret_id: str, guesses: int) -> Counter[int]:
    """``guesses`` wrong passphrases at once, spread over ``urls``: the statuses answered."""

    def guess(n: int) -> int:
        answer = httpx.post(
            f"{urls[n % len(urls)]}/vault/secret/fetch",
            json={"secret_id": secret_id, "passphrase": f"guess {n}"},
            timeout=30,
        )
        return answer.status_code

    with concurrent.futures.ThreadPoolExecutor(guesses) as pool:
        return Counter(pool.map(guess, range(guesses)))


def assert_exactly_the_limit_counted(urls: list[str], limit: int) -> None:
    with httpx.Client(base_url=urls[0]) as client:
        made = create(client, receipt=True, max_reads=100)
    statuses = race_wrong_guesses(urls, made["secret_id"], 4 * limit)
    # Exactly the limit counted (403 each); every later guess found it gone.
    assert statuses == Counter({403: limit, 404: 3 * limit})
    for url in urls:
        with httpx.Client(base_url=url) as client:
            assert fetch(client, made["secret_id"], passphrase=PASSPHRASE).status_code == 404
            receipt = status(client, made["receipt_id"])
            assert (receipt["state"], receipt["passphrase_failures"]) == ("deleted", limit)


@pytest.mark.slow
def test_wrong_guesses_racing_on_two_replicas_count_exactly_the_limit(
    start_replicas: Callable[..., Any],
) -> None:
    servers, _ = start_replicas(PASSPHRASE_MAX_ATTEMPTS="4")
    assert_exactly_the_limit_counted([server.url for server in servers], 4)


@pytest.mark.slow
def test_wrong_guesses_racing_on_two_workers_count_exactly_the_limit(
    start_server: Callable[..., ServerProcess], master_key: str, tmp_path: Path
) -> None:
    env = {
        "MASTER_KEY": master_key,
        "DATA_DIR": str(tmp_path / "data"),
        "RATE_LIMIT": "off",
        "PASSPHRASE_MAX_ATTEMPTS": "4",
    }
    server = start_server(env, "--workers", "2")
    assert_exactly_the_limit_counted([server.url], 4)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


@pytest.mark.slow
def test_refusals_and_the_deletion_are_signed_events(
    start_server: Callable[..., ServerProcess],
    store_env: dict[str, str],
    receiver: Receiver,
) -> None:
    env = {
        **store_env,
        "WEBHOOK_URLS": receiver.url,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_EVENTS": f"{DENIED},{DELETED}",
        "RATE_LIMIT": "off",
        "PASSPHRASE_MAX_ATTEMPTS": "2",
    }
    server = start_server(env)
    with httpx.Client(base_url=server.url) as client:
        made = create(client, receipt=True, label="db password")
        fetch(client, made["secret_id"])
        fetch(client, made["secret_id"], passphrase="one")
        fetch(client, made["secret_id"], passphrase="two")
    wait_until(lambda: len(receiver.acknowledged()) >= 4, 30, "four events delivered")
    events = payloads(receiver)
    assert sorted(event["type"] for event in events) == [DELETED, DENIED, DENIED, DENIED]
    for event in events:
        assert event["data"]["receipt_id"] == made["receipt_id"]
        assert event["data"]["label"] == "db password"
    bodies = "".join(str(delivery.body) for delivery in receiver.acknowledged())
    assert PASSPHRASE not in bodies
    assert made["secret_id"] not in bodies


@pytest.mark.parametrize("marker", ["scrypt:16384:8:1", None], ids=["cheaper", "stripped"])
def test_a_passphrase_marker_edited_in_the_database_is_not_served(
    client: TestClient, store_env: dict[str, str], raw_records: RawRecords, marker: str | None
) -> None:
    secret_id = create(client)["secret_id"]
    key = record_key(secret_id)
    if raw_records.kind == "sqlite":
        with sqlite3.connect(Path(store_env["DATA_DIR"]) / "vault.db") as conn:
            conn.execute("UPDATE secrets SET kdf = ? WHERE record_key = ?", (marker, key))
    else:
        with pymongo.MongoClient(store_env["MONGO_URI"]) as mongo:
            secrets = mongo[store_env["MONGO_DB"]]["secrets"]
            edit = {"$set": {"kdf": marker}} if marker else {"$unset": {"kdf": ""}}
            secrets.update_one({"_id": key}, edit)
    # The marker is in the master key's associated data: the record fails authentication
    # (500) before any derivation, rather than weakening or dropping the passphrase layer.
    for fields in ({"passphrase": PASSPHRASE}, {}):
        answer = fetch(client, secret_id, **fields)
        assert answer.status_code == 500, answer.text
        assert b64(PLAINTEXT) not in answer.text
    assert client.get("/readyz").json()["records_unreadable"] >= 1
