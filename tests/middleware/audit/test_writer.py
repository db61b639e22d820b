"""middleware/audit/writer.py: every record stored or logged, sync and async, none lost.

The store's own grouping of concurrent inserts is tested against real stores in
tests/test_audit.py; here the store's insert is a stand-in that can be slow, down, or
refuse one record.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from middleware.audit.writer import AuditUnavailable, AuditWriter
from observability.audit import AuditRecord
from tests.conftest import audit_record


class FakeStore:
    """An audit insert that takes real time, like a fsync; it can be down (every call
    raises) or refuse given request ids alone (as a unique index would)."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.down = False
        self.refused: set[str] = set()
        self.stored: list[str] = []
        self.calls: dict[str, int] = {}
        self.record_ids: dict[str, set[str]] = {}

    async def insert(self, record: AuditRecord) -> Exception | None:
        request_id = record.request_id
        self.calls[request_id] = self.calls.get(request_id, 0) + 1
        self.record_ids.setdefault(request_id, set()).add(record.record_id)
        await asyncio.sleep(self.delay)
        if self.down:
            raise OSError("disk on fire")
        if request_id in self.refused:
            return ValueError("duplicate key")
        self.stored.append(request_id)
        return None


def not_stored(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]


def test_concurrent_writes_all_land_and_are_counted() -> None:
    store = FakeStore()
    written: list[int] = []

    async def main() -> None:
        writer = AuditWriter(store.insert, on_written=written.append)
        await writer.start()
        await asyncio.gather(*(writer.write(audit_record(f"r{i}")) for i in range(200)))
        await writer.close()

    asyncio.run(main())
    assert sorted(store.stored) == sorted(f"r{i}" for i in range(200))
    assert sum(written) == 200


def test_a_store_that_is_down_fails_every_waiter_and_counts() -> None:
    store = FakeStore()
    store.down = True
    failed: list[int] = []

    async def main() -> list[object]:
        writer = AuditWriter(store.insert, on_failed=failed.append)
        await writer.start()
        results = await asyncio.gather(
            *(writer.write(audit_record(f"r{i}")) for i in range(5)), return_exceptions=True
        )
        await writer.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, AuditUnavailable) for r in results)
    assert sum(failed) == 5


def test_a_record_refused_alone_fails_only_its_own_request() -> None:
    store = FakeStore()
    store.refused = {"r2"}
    failed: list[int] = []

    async def main() -> list[object]:
        writer = AuditWriter(store.insert, on_failed=failed.append)
        await writer.start()
        results = await asyncio.gather(
            *(writer.write(audit_record(f"r{i}")) for i in range(4)), return_exceptions=True
        )
        await writer.close()
        return results

    results = asyncio.run(main())
    assert [isinstance(r, AuditUnavailable) for r in results] == [False, False, True, False]
    assert sorted(store.stored) == ["r0", "r1", "r3"]
    assert failed == [1]


def test_async_mode_returns_at_once_and_close_flushes_everything() -> None:
    store = FakeStore(delay=0.05)

    async def main() -> float:
        writer = AuditWriter(store.insert, wait=False)
        await writer.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(100):
            await writer.write(audit_record(f"r{i}"))
        queued_in = loop.time() - started
        await writer.close()
        return queued_in

    queued_in = asyncio.run(main())
    assert queued_in < 0.05  # nobody waited for a store write
    assert sorted(store.stored) == sorted(f"r{i}" for i in range(100))


def test_async_mode_retries_until_the_store_is_back_with_the_same_record_ids() -> None:
    store = FakeStore(delay=0.0)
    store.down = True

    async def main() -> None:
        writer = AuditWriter(store.insert, wait=False, retry_delay=0.05)
        await writer.start()
        for i in range(10):
            await writer.write(audit_record(f"r{i}"))
        await asyncio.sleep(0.2)
        store.down = False
        await asyncio.sleep(0.2)
        await writer.close()

    asyncio.run(main())
    assert sorted(store.stored) == sorted(f"r{i}" for i in range(10))
    assert min(store.calls.values()) > 1  # tried while down, then again
    # Each retry sends the record_id fixed at creation: a store finds a landed retry stored.
    assert all(len(ids) == 1 for ids in store.record_ids.values())


def test_async_mode_never_retries_a_record_refused_alone_nor_waits_on_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore(delay=0.0)
    store.refused = {"reused"}
    failed: list[int] = []
    caplog.set_level(logging.ERROR, logger="secret_manager.audit")

    async def main() -> None:
        writer = AuditWriter(store.insert, wait=False, retry_delay=10, on_failed=failed.append)
        await writer.start()
        for request_id in ("a", "reused", "b"):
            await writer.write(audit_record(request_id))
        await asyncio.sleep(0.05)
        await writer.write(audit_record("c"))  # not stuck behind the refused one
        await asyncio.sleep(0.05)
        assert sorted(store.stored) == ["a", "b", "c"]  # before close, no retry delay taken
        await writer.close()

    asyncio.run(main())
    assert store.calls["reused"] == 1
    assert failed == [1]
    (logged,) = not_stored(caplog)
    assert "refused by the store" in logged and '"request_id":"reused"' in logged


def test_records_the_store_never_took_are_logged_not_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore(delay=0.0)
    store.down = True
    caplog.set_level(logging.ERROR)

    async def main() -> None:
        writer = AuditWriter(store.insert, wait=False, retry_delay=0.01)
        await writer.start()
        await writer.write(audit_record("r7"))
        await asyncio.sleep(0.05)
        await writer.close()

    asyncio.run(main())
    (logged,) = not_stored(caplog)
    assert "shutting down" in logged and '"request_id":"r7"' in logged


def test_async_backlog_is_bounded_and_the_overflow_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore(delay=0.0)
    store.down = True
    caplog.set_level(logging.ERROR, logger="secret_manager.audit")

    async def main() -> None:
        writer = AuditWriter(store.insert, wait=False, retry_delay=0.02, max_pending=3)
        await writer.start()
        for i in range(5):
            await writer.write(audit_record(f"r{i}"))
        await asyncio.sleep(0.05)
        store.down = False
        await asyncio.sleep(0.1)
        await writer.close()

    asyncio.run(main())
    assert sorted(store.stored) == ["r0", "r1", "r2"]
    logged = not_stored(caplog)
    assert len(logged) == 2
    assert all("too many records waiting" in line for line in logged)
    assert {json.loads(line.split(": ", 1)[1])["request_id"] for line in logged} == {"r3", "r4"}


def test_sync_mode_logs_a_submitted_record_the_store_did_not_take(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Submitted records acknowledge nothing (503 answers): in sync mode a failed one goes to
    # the log at once, as the waiting requests' refusals do, and is not retried.
    store = FakeStore(delay=0.0)
    store.down = True
    caplog.set_level(logging.ERROR, logger="secret_manager.audit")

    async def main() -> None:
        writer = AuditWriter(store.insert, retry_delay=0.01)
        await writer.start()
        writer.submit(audit_record("r503"))
        await asyncio.sleep(0.05)
        await writer.close()

    asyncio.run(main())
    assert store.calls == {"r503": 1}
    (logged,) = not_stored(caplog)
    assert "store failed" in logged and '"request_id":"r503"' in logged


def test_submitted_records_are_stored_without_anyone_waiting() -> None:
    store = FakeStore(delay=0.01)

    async def main() -> None:
        writer = AuditWriter(store.insert)
        await writer.start()
        writer.submit(audit_record("r503"))
        assert store.stored == []  # submit returned before any store call
        await writer.close()

    asyncio.run(main())
    assert store.stored == ["r503"]


def test_stdout_gets_one_json_line_per_stored_record() -> None:
    store = FakeStore(delay=0.0)
    store.refused = {"r1"}
    out = io.StringIO()

    async def main() -> None:
        writer = AuditWriter(store.insert, stdout=out)
        await writer.start()
        await asyncio.gather(
            *(writer.write(audit_record(f"r{i}")) for i in range(3)), return_exceptions=True
        )
        await writer.close()

    asyncio.run(main())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(line["request_id"] for line in lines) == ["r0", "r2"]  # stored ones only
    assert lines[0]["ts"].endswith("Z")


def test_writes_after_close_are_refused_and_submits_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="secret_manager.audit")

    async def main() -> None:
        writer = AuditWriter(FakeStore().insert)
        await writer.start()
        await writer.close()
        with pytest.raises(AuditUnavailable):
            await writer.write(audit_record("r1"))
        writer.submit(audit_record("r2"))

    asyncio.run(main())
    (logged,) = not_stored(caplog)
    assert "not running" in logged and '"request_id":"r2"' in logged
