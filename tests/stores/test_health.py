"""vault/stores/health.py: readiness follows the last write, and the probe's own writes."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from tests.conftest import b64
from vault.app import create_app
from vault.crypto import generate_key
from vault.errors import NotReady, StoreUnavailable
from vault.settings import Settings
from vault.stores.health import (
    DISK_FULL,
    PROBE_INTERVAL_SECONDS,
    REFUSING_WRITES,
    UNREACHABLE,
    WriteHealth,
    stored_any,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _writable() -> float | None:
    return REGISTRY.get_sample_value("vault_store_writable")


def test_the_last_write_decides_and_the_gauge_follows() -> None:
    health = WriteHealth(clock=Clock())
    health.raise_if_failing()  # no write yet: nothing known to fail
    health.failed(DISK_FULL)
    assert _writable() == 0
    with pytest.raises(NotReady) as raised:
        health.raise_if_failing()
    assert raised.value.reason == DISK_FULL
    health.succeeded()
    assert _writable() == 1
    health.raise_if_failing()


@pytest.mark.anyio
async def test_track_records_a_failure_with_its_reason_and_reraises() -> None:
    health = WriteHealth(clock=Clock())

    async def failing() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(sqlite3.OperationalError):
        await health.track(failing(), lambda exc: UNREACHABLE)
    assert health.failing == UNREACHABLE

    async def working() -> int:
        return 7

    assert await health.track(working(), lambda exc: UNREACHABLE, proves=True) == 7
    assert health.failing is None


@pytest.mark.anyio
async def test_only_a_write_as_large_as_a_create_makes_writes_work_again() -> None:
    # A small write (an audit record, the probe's small row) can fit in pages a refused
    # create left allocated: its success must not make the replica ready.
    health = WriteHealth(clock=Clock())
    health.failed(DISK_FULL)

    async def batch(results: list[Exception | None]) -> list[Exception | None]:
        return results

    assert await health.track(batch([None]), lambda exc: REFUSING_WRITES) == [None]
    assert health.failing == DISK_FULL  # a small write proves nothing
    assert _writable() == 0
    duplicate = sqlite3.IntegrityError("UNIQUE constraint failed")
    await health.track(batch([duplicate]), lambda exc: REFUSING_WRITES, proves=stored_any)
    assert health.failing == DISK_FULL  # a create that stored no record wrote nothing
    await health.track(batch([duplicate, None]), lambda exc: REFUSING_WRITES, proves=stored_any)
    assert health.failing is None  # a record stored: writes work
    assert _writable() == 1


@pytest.mark.anyio
async def test_the_reason_travels_on_the_error_not_in_its_text() -> None:
    health = WriteHealth(clock=Clock())

    async def fails(exc: Exception) -> None:
        raise exc

    # Mapped from the driver's error with its reason: that reason, whatever the message.
    with pytest.raises(StoreUnavailable):
        await health.track(
            fails(StoreUnavailable("sqlite: SQLITE_BUSY", reason=DISK_FULL)),
            lambda exc: REFUSING_WRITES,
        )
    assert health.failing == DISK_FULL
    # No reason on it (a timeout): the store's own answer for such errors, not its text.
    with pytest.raises(StoreUnavailable):
        await health.track(
            fails(StoreUnavailable("sqlite: SQLITE_FULL")), lambda exc: REFUSING_WRITES
        )
    assert health.failing == REFUSING_WRITES


@pytest.mark.anyio
async def test_a_read_counts_as_a_write_only_once_it_writes() -> None:
    # A fetch's store call reads, then writes the audit records riding with it (if any): a
    # read alone must not mark a failure; its few written pages must not clear one either.
    health = WriteHealth(clock=Clock())
    health.failed(DISK_FULL)

    async def call(result: int, *, fails: bool) -> int:
        if fails:
            raise sqlite3.OperationalError("database is locked")
        return result

    assert await health.track_writes(call(1, fails=False), lambda exc: UNREACHABLE,
                                     writes=False) == 1  # fmt: skip
    assert health.failing == DISK_FULL  # a read says nothing of writes
    assert await health.track_writes(call(2, fails=False), lambda exc: UNREACHABLE,
                                     writes=True) == 2  # fmt: skip
    assert health.failing == DISK_FULL  # an audit record fits where a create may not
    with pytest.raises(sqlite3.OperationalError):
        await health.track_writes(call(3, fails=True), lambda exc: UNREACHABLE, writes=False)
    assert health.failing == DISK_FULL  # the read failed before writing anything
    with pytest.raises(sqlite3.OperationalError):
        await health.track_writes(call(4, fails=True), lambda exc: UNREACHABLE, writes=True)
    assert health.failing == UNREACHABLE


def test_probe_writes_only_when_no_write_is_recent_and_at_most_once_a_second() -> None:
    clock = Clock()
    health = WriteHealth(clock=clock)
    assert health.claim_probe()  # nothing seen yet
    assert not health.claim_probe()  # a second probe at once: the first one writes
    clock.now += PROBE_INTERVAL_SECONDS
    health.failed(DISK_FULL)  # traffic's own writes are the signal while they come
    assert not health.claim_probe()
    clock.now += PROBE_INTERVAL_SECONDS
    assert health.claim_probe()


@pytest.mark.anyio
async def test_small_writes_do_not_keep_the_probe_from_writing() -> None:
    # Fetches' audit notes succeeding all the time say nothing of creates: the probe still
    # writes (as large as a create, while writes fail), or readiness would never come back.
    clock = Clock()
    health = WriteHealth(clock=clock)
    health.failed(DISK_FULL)

    async def small() -> None:
        return None

    clock.now += PROBE_INTERVAL_SECONDS
    await health.track(small(), lambda exc: REFUSING_WRITES)
    assert health.claim_probe()


def test_sqlite_readyz_follows_writes_refused_by_a_lock_and_recovers(tmp_path: Path) -> None:
    """A held write lock makes creates fail: /readyz says so, then 200 once writes work."""
    settings = Settings.from_env(
        {"MASTER_KEY": generate_key(), "DATA_DIR": str(tmp_path), "STORE_TIMEOUT_SECONDS": "0.5"}
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json() == {"status": "ready", "records_unreadable": 0}
        blocker = sqlite3.connect(tmp_path / "vault.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            refused = client.post("/vault/secret/create", json={"secret": b64(b"x")})
            assert refused.status_code == 503
            answer = client.get("/readyz")
            assert answer.status_code == 503
            assert answer.headers["retry-after"]
            assert answer.json()["status"] == "not ready"
            assert answer.json()["reason"] == "store refusing writes"
        finally:
            blocker.rollback()
            blocker.close()
        # No traffic: the probe's own write (at most once a second) sees writes work again.
        started = time.monotonic()
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() - started < 10, "readiness never came back"
            time.sleep(0.1)
        assert client.get("/readyz").json() == {"status": "ready", "records_unreadable": 0}
        with sqlite3.connect(tmp_path / "vault.db") as conn:
            assert conn.execute("SELECT count(*) FROM secrets").fetchone()[0] == 0
