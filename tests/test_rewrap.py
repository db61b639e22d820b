"""vault/rewrap.py and ``secret-manager rewrap``: key rotation on both stores, while serving."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo
import pytest
from starlette.testclient import TestClient

from tests.conftest import (
    RawRecords,
    b64,
    clean_env,
    free_port,
    keys_of,
    on_store,
    read_back,
    write_legacy,
)
from vault.app import build_keyring
from vault.crypto import (
    SCRYPT_KDF,
    Keyring,
    derive_audit_key,
    derive_passphrase_key,
    generate_key,
    key_id,
    parse_key,
    secret_id_hmac,
    unlock,
)
from vault.errors import DecryptionFailed
from vault.lifecycle import Caller, Fetched, Found
from vault.records import SealedSecret, record_key
from vault.rewrap import rewrap
from vault.settings import Settings
from vault.stores.base import Remaining, SecretStore

_SUMMARY = re.compile(
    r"^  (examined|rewrapped|would rewrap|converted|would convert|changed concurrently"
    r"|unknown key|failed authentication|remaining under other keys|remaining keyed by id)"
    r" +(\d+)$",
    re.MULTILINE,
)


# Runs the command after it as a shell runs a background job: with SIGINT ignored.
IGNORING_SIGINT = ["sh", "-c", "trap '' INT; exec \"$@\"", "sh"]


def run_rewrap(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vault", "rewrap", *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def summary(output: str) -> dict[str, int]:
    return {label: int(number) for label, number in _SUMMARY.findall(output)}


def kid(key: str) -> str:
    return key_id(parse_key(key))


def create(client: TestClient, count: int) -> dict[str, bytes]:
    secrets = {}
    for i in range(count):
        data = os.urandom(1 + i * 37)
        response = client.post("/vault/secret/create", json={"secret": b64(data)})
        assert response.status_code == 200, response.text
        secrets[response.json()["secret_id"]] = data
    return secrets


def assert_fetches(client: TestClient, secrets: dict[str, bytes]) -> None:
    for secret_id, data in secrets.items():
        response = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
        assert response.status_code == 200, response.text
        assert base64.b64decode(response.json()["secret"]) == data


def key_ids(raw: RawRecords) -> dict[str, str]:
    return raw.key_ids()


@pytest.fixture
def rotated(store_env: dict[str, str]) -> dict[str, str]:
    """The rotation's environment: a new active key, the old one (store_env's) previous."""
    return {
        **store_env,
        "MASTER_KEY": generate_key(),
        "MASTER_KEY_PREVIOUS": store_env["MASTER_KEY"],
    }


def has_kid_index(store_kind: str, env: dict[str, str]) -> bool:
    if store_kind == "sqlite":
        import sqlite3

        with sqlite3.connect(Path(env["DATA_DIR"]) / "vault.db") as conn:
            rows = conn.execute("PRAGMA index_list(secrets)").fetchall()
            columns = [conn.execute(f"PRAGMA index_info({row[1]})").fetchall() for row in rows]
        return any([c[2] for c in cols] == ["key_id"] for cols in columns)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(env["MONGO_URI"])
    try:
        indexes = client[env["MONGO_DB"]]["secrets"].index_information()
    finally:
        client.close()
    return any(list(index["key"]) == [("kid", 1)] for index in indexes.values())


# --- the command, end to end ------------------------------------------------------------


def test_the_documented_two_step_roll_never_leaves_a_replica_unable_to_open(
    make_client: Callable[..., TestClient], rotated: dict[str, str]
) -> None:
    old_key, new_key = rotated["MASTER_KEY_PREVIOUS"], rotated["MASTER_KEY"]
    not_rolled = make_client()  # the old key alone
    step_one = make_client(MASTER_KEY=old_key, MASTER_KEY_PREVIOUS=new_key)
    step_two = make_client(MASTER_KEY=new_key, MASTER_KEY_PREVIOUS=old_key)
    before = create(not_rolled, 2)
    sealed_new = create(step_two, 2)

    # Rolling straight to step two: a replica not yet rolled cannot open what it sealed.
    refused = not_rolled.post("/vault/secret/fetch", json={"secret_id": next(iter(sealed_new))})
    assert refused.status_code == 500
    # Step one everywhere first: every replica opens both, whichever step it is at.
    for replica in (step_one, step_two):
        assert_fetches(replica, before | sealed_new | create(step_one, 1))


@pytest.mark.slow
def test_rewrap_moves_every_record_to_the_active_key_and_the_old_key_can_go(
    make_client: Callable[..., TestClient],
    rotated: dict[str, str],
    raw_records: RawRecords,
    store_kind: str,
) -> None:
    old = create(make_client(), 7)
    # Replicas already rolled over seal new secrets with the new key: nothing to rewrap there.
    fresh = create(make_client(**rotated), 2)

    result = run_rewrap(rotated, "--batch-size", "3")

    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(result.stdout) == {
        "examined": 7,
        "rewrapped": 7,
        "converted": 0,
        "changed concurrently": 0,
        "unknown key": 0,
        "failed authentication": 0,
        "remaining under other keys": 0,
        "remaining keyed by id": 0,
    }
    assert [
        line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("batch")
    ] == [
        "batch 1",
        "batch 2",
        "batch 3",
    ]
    assert "remove them from MASTER_KEY_PREVIOUS" in result.stdout
    assert set(key_ids(raw_records).values()) == {kid(rotated["MASTER_KEY"])}
    assert has_kid_index(store_kind, rotated)
    # The old key is no longer needed by any record.
    only_new_key = make_client(MASTER_KEY=rotated["MASTER_KEY"])
    assert_fetches(only_new_key, old | fresh)

    again = run_rewrap(rotated)
    assert again.returncode == 0, again.stderr
    assert summary(again.stdout)["examined"] == 0


@pytest.mark.slow
def test_a_run_stopped_part_way_is_continued_by_the_next(
    make_client: Callable[..., TestClient], rotated: dict[str, str], raw_records: RawRecords
) -> None:
    secrets = create(make_client(), 7)
    new_kid = kid(rotated["MASTER_KEY"])

    first = run_rewrap(rotated, "--batch-size", "2", "--max-batches", "1")

    assert first.returncode == 1
    counts = summary(first.stdout)
    assert (counts["examined"], counts["rewrapped"], counts["remaining under other keys"]) == (
        2,
        2,
        5,
    )
    assert "run rewrap again to continue" in first.stderr
    kids = key_ids(raw_records)
    # In record key order: the two lowest keys are done, the rest wait, none is half done.
    assert [kids[i] == new_kid for i in sorted(kids)] == [True, True] + [False] * 5

    second = run_rewrap(rotated, "--batch-size", "2")

    assert second.returncode == 0, second.stderr
    counts = summary(second.stdout)
    assert (counts["examined"], counts["rewrapped"], counts["remaining under other keys"]) == (
        5,
        5,
        0,
    )
    assert set(key_ids(raw_records).values()) == {new_kid}
    assert_fetches(make_client(MASTER_KEY=rotated["MASTER_KEY"]), secrets)


@pytest.mark.slow
def test_ctrl_c_stops_between_atomic_swaps_and_a_new_run_finishes(
    store_env: dict[str, str], rotated: dict[str, str], raw_records: RawRecords
) -> None:
    keyring = build_keyring(Settings.from_env(store_env))
    secrets = {str(i).zfill(36): os.urandom(32) for i in range(150)}

    async def fill(store: SecretStore) -> None:
        for secret_id, data in secrets.items():
            await store.insert(keyring.seal(record_key(secret_id), data))

    on_store(store_env, fill)
    # Started as a shell starts a background job, with SIGINT ignored (`trap '' INT` is what
    # `&` does in a script): rewrap must stop on it all the same, however it was launched.
    process = subprocess.Popen(
        [*IGNORING_SIGINT, sys.executable, "-m", "vault", "rewrap", "--batch-size", "1"],
        env=clean_env(**rotated),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("batch 1:"):
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=60)

    assert process.returncode == 130, err
    assert "interrupted" in err and "run rewrap again" in err
    assert "Traceback" not in err
    done = summary(out)["rewrapped"]
    assert 0 < done < len(secrets)

    second = run_rewrap(rotated)
    assert second.returncode == 0, second.stderr
    assert set(key_ids(raw_records).values()) == {kid(rotated["MASTER_KEY"])}
    new_keyring = build_keyring(
        Settings.from_env({**store_env, "MASTER_KEY": rotated["MASTER_KEY"]})
    )

    async def read_all(store: SecretStore) -> dict[str, bytes]:
        records = {i: await read_back(store, i) for i in secrets}
        return {i: new_keyring.open(r) for i, r in records.items() if r is not None}

    assert on_store(store_env, read_all) == secrets


@pytest.mark.slow
def test_records_the_keyring_cannot_open_are_reported_and_left_alone(
    make_client: Callable[..., TestClient], rotated: dict[str, str], raw_records: RawRecords
) -> None:
    readable = create(make_client(), 3)
    lost_key = generate_key()
    (orphan,) = create(make_client(MASTER_KEY=lost_key), 1)
    tampered = next(iter(readable))
    record = raw_records.get(tampered)
    flipped = bytes([record["ciphertext"][0] ^ 1]) + record["ciphertext"][1:]
    raw_records.put(tampered, {**record, "ciphertext": flipped})
    before = {i: raw_records.get(i) for i in (orphan, tampered)}

    # The key guard refuses a pass while a record's key is not configured ...
    refused = run_rewrap(rotated)
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert f"1 record sealed by key {kid(lost_key)}" in line
    assert "set MASTER_KEY_PREVIOUS to the key(s) that sealed them" in line
    assert refused.stdout == ""  # no pass began
    # Nothing rewrapped: every record is still sealed as it was.
    assert {raw_records.get(i)["key_id"] for i in readable} == {kid(rotated["MASTER_KEY_PREVIOUS"])}

    # ... unless it was retired on purpose: then the pass leaves those records alone.
    result = run_rewrap({**rotated, "RETIRED_KEY_IDS": kid(lost_key)})

    assert result.returncode == 1
    assert summary(result.stdout) == {
        "examined": 4,
        "rewrapped": 2,
        "converted": 0,
        "changed concurrently": 0,
        "unknown key": 1,
        "failed authentication": 1,
        "remaining under other keys": 2,
        "remaining keyed by id": 0,
    }
    assert {i: raw_records.get(i) for i in (orphan, tampered)} == before
    # Named by the key they are stored under, which fetches nothing, never by their id.
    output = result.stdout + result.stderr
    assert f"key {kid(lost_key)}, not configured" in output
    assert f"record_key {record_key(orphan)}" in output
    assert f"record_key {record_key(tampered)}" in output
    assert not any(secret_id in output for secret_id in readable | {orphan: b""})
    assert "keep every key that may have sealed them in MASTER_KEY_PREVIOUS" in result.stderr

    # The operator finds the lost key and adds it: only the tampered record is left.
    with_lost_key = {
        **rotated,
        "MASTER_KEY_PREVIOUS": f"{rotated['MASTER_KEY_PREVIOUS']},{lost_key}",
    }
    result = run_rewrap(with_lost_key)
    assert result.returncode == 1
    counts = summary(result.stdout)
    assert (counts["rewrapped"], counts["unknown key"], counts["failed authentication"]) == (
        1,
        0,
        1,
    )
    assert raw_records.get(orphan)["key_id"] == kid(rotated["MASTER_KEY"])
    assert raw_records.get(tampered) == before[tampered]


@pytest.mark.slow
def test_dry_run_counts_and_writes_nothing(
    make_client: Callable[..., TestClient], rotated: dict[str, str], raw_records: RawRecords
) -> None:
    secrets = create(make_client(), 3)
    before = {i: raw_records.get(i) for i in secrets}

    result = run_rewrap(rotated, "--dry-run")

    assert result.returncode == 1
    counts = summary(result.stdout)
    assert (counts["examined"], counts["would rewrap"], counts["remaining under other keys"]) == (
        3,
        3,
        0 + 3,
    )
    assert "run rewrap without --dry-run" in result.stderr
    assert {i: raw_records.get(i) for i in secrets} == before

    assert run_rewrap(rotated).returncode == 0
    after = run_rewrap(rotated, "--dry-run")
    assert after.returncode == 0
    assert "already sealed by the active key" in after.stdout


@pytest.mark.slow
def test_dry_run_says_when_no_configured_key_opens_a_record(
    make_client: Callable[..., TestClient], rotated: dict[str, str]
) -> None:
    (orphan,) = create(make_client(MASTER_KEY=generate_key()), 1)

    result = run_rewrap(rotated, "--dry-run")

    assert result.returncode == 1
    assert summary(result.stdout)["unknown key"] == 1
    (last,) = result.stderr.splitlines()[-1:]
    assert "1 cannot be opened with the configured keys" in last
    assert "rewrap cannot re-encrypt them" in last
    # Nothing here that a real run could re-encrypt: it must not be suggested.
    assert "without --dry-run" not in result.stderr
    assert orphan not in result.stdout + result.stderr


def legacy(keyring: Keyring, secret_id: str, plaintext: bytes, **lifecycle: Any) -> SealedSecret:
    """A record as the previous version sealed it: bound to its secret id, stored under it."""
    return dataclasses.replace(keyring.seal(secret_id, plaintext), **lifecycle)


def in_an_hour() -> dt.datetime:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(microsecond=0)


@pytest.mark.slow
def test_rewrap_converts_records_stored_under_their_id_while_they_are_served(
    make_client: Callable[..., TestClient],
    store_env: dict[str, str],
    rotated: dict[str, str],
    raw_records: RawRecords,
) -> None:
    old_ring = build_keyring(Settings.from_env(store_env))
    new_ring = build_keyring(Settings.from_env(rotated))
    later = in_an_hour()
    by_id: dict[str, bytes] = {}
    records = []
    for n in range(5):
        secret_id, data = str(uuid.uuid4()), os.urandom(20 + n)
        by_id[secret_id] = data
        lifecycle: dict[str, Any] = {1: {"reads_left": 3}, 2: {"expires_at": later}}.get(n, {})
        # Sealed by the old key, or by the new one already: converted all the same.
        records.append(legacy(old_ring if n % 2 else new_ring, secret_id, data, **lifecycle))
    limited, expiring = records[1].record_key, records[2].record_key
    write_legacy(store_env, records)
    digests = create(make_client(), 3)  # sealed by the old key, under their record keys
    replica = make_client(**rotated)
    assert_fetches(replica, by_id | digests)  # served as they are: 2 reads left on one

    dry = run_rewrap(rotated, "--dry-run", "--batch-size", "2")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    counts = summary(dry.stdout)
    assert (counts["would convert"], counts["would rewrap"]) == (5, 3)
    assert (counts["remaining keyed by id"], counts["remaining under other keys"]) == (5, 5)
    assert "5 are keyed by their secret id" in dry.stderr
    assert raw_records.record_keys() == set(by_id) | keys_of(*digests)  # nothing written

    result = run_rewrap(rotated, "--batch-size", "2")

    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(result.stdout) == {
        "examined": 8,
        "rewrapped": 3,
        "converted": 5,
        "changed concurrently": 0,
        "unknown key": 0,
        "failed authentication": 0,
        "remaining under other keys": 0,
        "remaining keyed by id": 0,
    }
    assert "and stored under its record key" in result.stdout
    assert not any(secret_id in result.stdout + result.stderr for secret_id in by_id)
    # No id left anywhere in the store, in text or as the UUID's 16 bytes.
    assert raw_records.record_keys() == keys_of(*by_id, *digests)
    assert set(key_ids(raw_records).values()) == {kid(rotated["MASTER_KEY"])}
    dump = raw_records.dump()
    for secret_id in by_id:
        assert secret_id.encode() not in dump and uuid.UUID(secret_id).bytes not in dump
    converted = raw_records.sealed(limited)
    assert converted is not None and converted.reads_left == 2
    assert (raw_records.sealed(expiring) or converted).expires_at == later
    # Every secret still fetches by its id, with the new key alone.
    assert_fetches(make_client(MASTER_KEY=rotated["MASTER_KEY"]), by_id | digests)
    assert replica.post("/vault/secret/fetch", json={"secret_id": limited}).json() == {
        "secret": b64(by_id[limited]),
        "reads_left": 0,
    }

    again = run_rewrap(rotated)
    assert again.returncode == 0, again.stderr
    assert summary(again.stdout)["examined"] == 0


@pytest.mark.slow
def test_a_conversion_stopped_part_way_exits_1_and_the_next_run_finishes_it(
    make_client: Callable[..., TestClient], store_env: dict[str, str], raw_records: RawRecords
) -> None:
    keyring = build_keyring(Settings.from_env(store_env))
    by_id = {str(uuid.uuid4()): os.urandom(16) for _ in range(4)}
    write_legacy(store_env, [legacy(keyring, i, data) for i, data in by_id.items()])

    # No rotation at all: records under the active key are converted too.
    first = run_rewrap(store_env, "--batch-size", "1", "--max-batches", "2")

    assert first.returncode == 1
    counts = summary(first.stdout)
    assert (counts["converted"], counts["remaining keyed by id"]) == (2, 2)
    assert "2 records are still keyed by their secret id: run rewrap again to continue" in (
        first.stderr
    )
    assert len(raw_records.record_keys() & set(by_id)) == 2
    assert_fetches(make_client(), by_id)  # half converted, all served

    second = run_rewrap(store_env)
    assert second.returncode == 0, second.stderr
    assert summary(second.stdout)["converted"] == 2
    assert raw_records.record_keys() == keys_of(*by_id)
    assert_fetches(make_client(), by_id)


@pytest.mark.slow
def test_start_up_problems_end_with_one_line_and_exit_2(tmp_path: Path) -> None:
    no_key = run_rewrap({"DATA_DIR": str(tmp_path)})
    assert no_key.returncode == 2
    assert no_key.stderr.startswith("secret-manager: MASTER_KEY is not set")
    assert len(no_key.stderr.splitlines()) == 1

    wrong_dir = run_rewrap({"MASTER_KEY": generate_key(), "DATA_DIR": str(tmp_path / "empty")})
    assert wrong_dir.returncode == 2
    assert "holds no vault.db" in wrong_dir.stderr
    assert len(wrong_dir.stderr.splitlines()) == 1
    assert not (tmp_path / "empty" / "vault.db").exists()


@pytest.mark.slow
def test_a_database_that_does_not_answer_stops_rewrap_in_seconds() -> None:
    env = {
        "MASTER_KEY": generate_key(),
        "MONGO_URI": f"mongodb://127.0.0.1:{free_port()}/",  # nothing listens there
        "STORE_TIMEOUT_SECONDS": "1",
    }
    started = time.monotonic()
    result = run_rewrap(env)
    # Found by the key guard's first call, not after the index build's ten-minute budget.
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("secret-manager: rewrap did not start: the store could not be asked")
    assert "run rewrap again once it answers" in last
    assert result.stdout == ""


# --- while replicas serve, and the store operations it relies on -------------------------


def test_the_service_keeps_creating_and_fetching_while_rewrap_runs(
    make_client: Callable[..., TestClient],
    store_env: dict[str, str],
    rotated: dict[str, str],
    raw_records: RawRecords,
) -> None:
    old = create(make_client(), 24)
    replica = make_client(**rotated)
    settings = Settings.from_env(rotated)
    keyring = build_keyring(settings)
    hash_id = functools.partial(secret_id_hmac, derive_audit_key(parse_key(rotated["MASTER_KEY"])))
    batch_done, served = threading.Semaphore(0), threading.Semaphore(0)
    outcome: dict[str, Any] = {}

    def echo(line: str) -> None:
        # After every batch, let the replica serve a round before the next batch starts.
        if line.startswith("batch"):
            batch_done.release()
            assert served.acquire(timeout=30)

    def run() -> None:
        try:
            outcome["report"] = on_store(
                rotated,
                functools.partial(
                    rewrap, keyring=keyring, hash_secret_id=hash_id, batch_size=5, echo=echo
                ),
            )
        except BaseException as exc:
            outcome["error"] = exc
            batch_done.release()

    thread = threading.Thread(target=run)
    thread.start()
    created: dict[str, bytes] = {}
    rounds = 0
    while thread.is_alive():
        if not batch_done.acquire(timeout=0.05):
            continue
        if "error" in outcome:
            break
        created |= create(replica, 2)
        assert_fetches(replica, {i: old[i] for i in list(old)[rounds::5]} | created)
        rounds += 1
        served.release()
    thread.join(30)

    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    assert report.ok and report.totals.rewrapped == 24 and report.totals.changed == 0
    assert rounds == report.batches == 5
    assert set(key_ids(raw_records).values()) == {kid(rotated["MASTER_KEY"])}
    assert_fetches(make_client(MASTER_KEY=rotated["MASTER_KEY"]), old | created)


def test_replace_sealed_never_overwrites_a_record_that_changed(
    make_client: Callable[..., TestClient], rotated: dict[str, str], raw_records: RawRecords
) -> None:
    (secret_id,) = create(make_client(), 1)
    keyring = build_keyring(Settings.from_env(rotated))

    async def work(store: SecretStore) -> None:
        read = raw_records.sealed(secret_id)
        assert read is not None
        plaintext = keyring.open(read)
        key = record_key(secret_id)
        first = keyring.seal(key, plaintext)
        assert await store.replace_sealed(read, first) is True
        # A second rewrap holding the same stale read: the key id has changed since.
        assert await store.replace_sealed(read, keyring.seal(key, plaintext)) is False
        # Same key id as stored, another nonce: a change the key id alone would not show.
        stale = dataclasses.replace(first, nonce=os.urandom(12))
        assert await store.replace_sealed(stale, keyring.seal(key, plaintext)) is False
        assert raw_records.sealed(secret_id) == first

    on_store(rotated, work)
    assert raw_records.get(secret_id)["key_id"] == kid(rotated["MASTER_KEY"])


def test_records_to_rewrap_pages_in_record_key_order(
    make_client: Callable[..., TestClient], rotated: dict[str, str]
) -> None:
    old = create(make_client(), 5)
    create(make_client(**rotated), 2)
    active = kid(rotated["MASTER_KEY"])

    async def work(store: SecretStore) -> tuple[list[list[str]], int]:
        pages, after = [], ""
        while page := await store.records_to_rewrap(active, after, 2):
            assert all(record.key_id != active for record in page)
            pages.append([record.record_key for record in page])
            after = page[-1].record_key
        return pages, await store.count_to_rewrap(active)

    pages, count = on_store(rotated, work)
    keys = sorted(keys_of(*old))
    assert pages == [keys[0:2], keys[2:4], keys[4:]]
    assert count == Remaining(records=5, other_keys=5, keyed_by_id=0)


class RacingStore:
    """A real store whose callers race rewrap: after each page rewrap reads, and before it
    writes any record back, the records of that page are deleted, read or left alone."""

    def __init__(self, store: SecretStore, deleted: set[str], read: set[str]) -> None:
        self._store = store
        self._ids = {record_key(i): i for i in deleted | read}  # what a record keeps: the key
        self._deleted = deleted
        self._read = read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def records_to_rewrap(self, key_id: str, after: str, limit: int) -> list[Any]:
        page = await self._store.records_to_rewrap(key_id, after, limit)
        for record in page:
            secret_id = self._ids.get(record.record_key)
            if secret_id in self._deleted:
                assert await self._store.delete(secret_id) is not None
            elif secret_id in self._read:
                assert await read_back(self._store, secret_id) is not None
        return page


@pytest.mark.slow
def test_rewrap_keeps_lifecycles_and_never_brings_back_what_went_while_it_ran(
    make_client: Callable[..., TestClient], rotated: dict[str, str], raw_records: RawRecords
) -> None:
    old = make_client()
    made = {}
    for n in range(30):
        fields: dict[str, object] = {"secret": b64(f"s{n}".encode())}
        if n % 3 == 0:
            fields["max_reads"] = 3
        if n % 5 == 0:
            fields["ttl_seconds"] = 3600
        made[old.post("/vault/secret/create", json=fields).json()["secret_id"]] = fields
    ids = sorted(made)
    limited = [i for i in ids if "max_reads" in made[i]]
    deleted = set(ids[1::4])
    read = {i for i in limited if i not in deleted}
    one_read_left = {limited[0]} - deleted  # used up during the pass: gone for good
    keyring = build_keyring(Settings.from_env(rotated))
    hash_id = functools.partial(secret_id_hmac, b"k" * 32)

    async def work(store: SecretStore) -> Any:
        for secret_id in one_read_left:  # two of its three reads before rewrap starts
            await read_back(store, secret_id)
            await read_back(store, secret_id)
        racing: Any = RacingStore(store, deleted, read)
        return await rewrap(racing, keyring, hash_secret_id=hash_id, batch_size=4)

    report = on_store(rotated, work)
    assert report.ok
    assert raw_records.record_keys() == keys_of(*(set(ids) - deleted - one_read_left))
    new = make_client(**rotated)
    for secret_id in ids:
        answer = new.post("/vault/secret/fetch", json={"secret_id": secret_id})
        if secret_id in deleted | one_read_left:
            assert answer.status_code == 404
            continue
        assert answer.status_code == 200
        body = answer.json()
        assert body["secret"] == made[secret_id]["secret"]
        if "max_reads" in made[secret_id]:
            assert body["reads_left"] == (1 if secret_id in read else 2)
        assert ("expires_at" in body) == ("ttl_seconds" in made[secret_id])


# --- who may see a secret survives rotation ---------------------------------------------


def edit_access(env: dict[str, str], key: str, **fields: Any) -> None:
    """Overwrite who may see the record stored under ``key``, below the service (a database
    edit): ``tenant`` as text, ``readers`` as a list of names."""
    if "MONGO_URI" in env:
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            client[env["MONGO_DB"]]["secrets"].update_one({"_id": key}, {"$set": fields})
        return
    import json
    import sqlite3

    with contextlib.closing(sqlite3.connect(Path(env["DATA_DIR"]) / "vault.db")) as conn, conn:
        for name, value in fields.items():
            conn.execute(
                f"UPDATE secrets SET {name} = ? WHERE record_key = ?",  # noqa: S608 - test names
                (json.dumps(value) if name == "readers" else value, key),
            )


def test_rewrap_keeps_tenant_owner_and_readers_and_still_binds_them(
    store_env: dict[str, str], rotated: dict[str, str], raw_records: RawRecords
) -> None:
    old_ring = build_keyring(Settings.from_env(store_env))
    later = in_an_hour()
    made: dict[str, tuple[bytes, SealedSecret]] = {}
    for n in range(3):  # one to read, one to move to another tenant, one to give a reader
        secret_id, data = str(uuid.uuid4()), os.urandom(16 + n)
        sealed = old_ring.seal(
            record_key(secret_id), data, tenant="acme", owner="billing", readers=("ci", "ops")
        )
        made[secret_id] = (data, dataclasses.replace(sealed, expires_at=later, reads_left=5))
    plain_id, plain = str(uuid.uuid4()), b"plain"

    async def insert(store: SecretStore) -> None:
        for _, sealed in made.values():
            await store.insert(sealed)
        await store.insert(old_ring.seal(record_key(plain_id), plain))

    on_store(store_env, insert)
    hash_id = functools.partial(secret_id_hmac, b"k" * 32)
    report = on_store(
        rotated,
        lambda store: rewrap(
            store, build_keyring(Settings.from_env(rotated)), hash_secret_id=hash_id
        ),
    )
    assert report.ok and report.totals.rewrapped == 4
    assert set(key_ids(raw_records).values()) == {kid(rotated["MASTER_KEY"])}

    new_ring = Keyring(parse_key(rotated["MASTER_KEY"]))  # the new key alone
    assert new_ring.key_ids == (kid(rotated["MASTER_KEY"]),)

    def fetch(secret_id: str, caller: Caller) -> Fetched:
        async def work(store: SecretStore) -> Fetched:
            fetched, _ = await store.fetch(secret_id, new_ring, None, caller)
            return fetched

        result: Fetched = on_store(rotated, work)
        return result

    (read_id, moved_id, widened_id) = made
    data, before = made[read_id]
    got = fetch(read_id, Caller("acme", "ops"))
    assert (got.found, got.plaintext) == (Found.SECRET, data)
    assert got.record is not None
    assert (got.record.tenant, got.record.owner, got.record.readers) == (
        "acme",
        "billing",
        ("ci", "ops"),
    )
    assert (got.record.expires_at, got.record.reads_left) == (later, 4)
    assert got.record.nonce != before.nonce  # sealed anew, by the new key
    for refused in (Caller("other", "ops"), Caller("acme", "billing"), Caller("acme", None)):
        assert fetch(read_id, refused).found is Found.DENIED
    got_plain = fetch(plain_id, Caller())
    assert (got_plain.found, got_plain.plaintext) == (Found.SECRET, plain)

    # Still bound after the rewrap: an edit that moves a secret to another tenant, or adds a
    # reader, leaves a record the new key does not open for anyone.
    edit_access(rotated, record_key(moved_id), tenant="globex")
    with pytest.raises(DecryptionFailed):
        fetch(moved_id, Caller("globex", "ops"))
    assert fetch(moved_id, Caller("acme", "ops")).found is Found.DENIED
    edit_access(rotated, record_key(widened_id), readers=["ci", "ops", "intruder"])
    for caller in (Caller("acme", "intruder"), Caller("acme", "ci")):
        with pytest.raises(DecryptionFailed):
            fetch(widened_id, caller)


# --- secrets under a passphrase ---------------------------------------------------------

PASSPHRASE = "correct horse battery staple"


def fetch_with(client: TestClient, secret_id: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    answer = client.post("/vault/secret/fetch", json={"secret_id": secret_id, **fields})
    body: dict[str, Any] = answer.json()
    return answer.status_code, body


def make_locked(client: TestClient, plaintext: bytes, *, wrong: int) -> dict[str, Any]:
    """A secret under PASSPHRASE with a receipt, and ``wrong`` wrong passphrases tried."""
    made = client.post(
        "/vault/secret/create",
        json={"secret": b64(plaintext), "passphrase": PASSPHRASE, "receipt": True},
    )
    assert made.status_code == 200, made.text
    answer: dict[str, Any] = made.json()
    for _ in range(wrong):
        assert fetch_with(client, answer["secret_id"], passphrase="tr0ub4dor&3")[0] == 403
    return answer


def wrong_tries(client: TestClient, receipt_id: str) -> int:
    answer = client.post("/vault/secret/status", json={"receipt_id": receipt_id})
    assert answer.status_code == 200, answer.text
    failures: int = answer.json()["passphrase_failures"]
    return failures


def test_a_secret_under_a_passphrase_is_rewrapped_without_it_and_still_asks_for_it(
    make_client: Callable[..., TestClient], rotated: dict[str, str], raw_records: RawRecords
) -> None:
    plaintext = os.urandom(24)
    locked = make_locked(make_client(), plaintext, wrong=2)
    secret_id = locked["secret_id"]
    before = on_store(rotated, lambda store: read_back(store, secret_id))
    assert before is not None and before.kdf is not None

    # The command is given no passphrase: only the master key's layer is sealed anew.
    result = run_rewrap(rotated)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (summary(result.stdout)["rewrapped"], summary(result.stdout)["unknown key"]) == (1, 0)
    assert raw_records.get(secret_id)["key_id"] == kid(rotated["MASTER_KEY"])
    after = on_store(rotated, lambda store: read_back(store, secret_id))
    assert after is not None and after.nonce != before.nonce
    assert (after.kdf, after.passphrase_failures) == (before.kdf, 2)

    only_new_key = make_client(MASTER_KEY=rotated["MASTER_KEY"])
    status, body = fetch_with(only_new_key, secret_id)
    assert status == 403 and "protected by a passphrase" in body["detail"]
    assert wrong_tries(only_new_key, locked["receipt_id"]) == 2
    # The two wrong tries spent before the rotation still count: the third leaves two.
    assert fetch_with(only_new_key, secret_id, passphrase="Tr0ub4dor&3") == (
        403,
        {"detail": "the passphrase is wrong; after 2 more wrong tries the secret is deleted"},
    )
    status, body = fetch_with(only_new_key, secret_id, passphrase=PASSPHRASE)
    assert (status, base64.b64decode(body["secret"])) == (200, plaintext)


def test_the_right_passphrase_under_a_wrong_master_key_opens_nothing(
    make_client: Callable[..., TestClient], store_env: dict[str, str]
) -> None:
    plaintext = b"launch codes " + os.urandom(8)
    owner = make_client()
    locked = make_locked(owner, plaintext, wrong=0)
    secret_id = locked["secret_id"]

    stranger = make_client(MASTER_KEY=generate_key())  # a server with another master key
    answer = stranger.post(
        "/vault/secret/fetch", json={"secret_id": secret_id, "passphrase": PASSPHRASE}
    )
    assert answer.status_code == 500, answer.text
    assert set(answer.json()) == {"detail"}
    assert b64(plaintext) not in answer.text
    # Nothing was spent: the secret is there, no wrong try counted, for the right key.
    assert wrong_tries(owner, locked["receipt_id"]) == 0

    # The database and the master key together, without the passphrase, give only the
    # passphrase's layer: sealed under a key that only the passphrase derives.
    sealed = on_store(store_env, lambda store: read_back(store, secret_id))
    assert sealed is not None and sealed.kdf == SCRYPT_KDF
    assert plaintext not in sealed.ciphertext
    layer = Keyring(parse_key(store_env["MASTER_KEY"])).open(sealed)
    assert plaintext not in layer
    assert unlock(derive_passphrase_key("not it", secret_id, sealed.kdf), layer) is None
    assert unlock(derive_passphrase_key(PASSPHRASE, secret_id, sealed.kdf), layer) == plaintext
    # Stripped of its marker (a database edit), the record no longer opens at all.
    with pytest.raises(DecryptionFailed):
        Keyring(parse_key(store_env["MASTER_KEY"])).open(dataclasses.replace(sealed, kdf=None))

    status, body = fetch_with(owner, secret_id, passphrase=PASSPHRASE)
    assert (status, base64.b64decode(body["secret"])) == (200, plaintext)
