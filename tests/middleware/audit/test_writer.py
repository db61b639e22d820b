"""observability/audit.py: group commit batches concurrent records and loses none."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Sequence

import pytest

from observability.audit import AuditRecord, AuditUnavailable, GroupCommitWriter
from tests.conftest import audit_record


class SlowStore:
    """An insert that takes real time, like a fsync, and can be made to fail."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.batches: list[list[str]] = []
        self.failing = False

    async def insert(self, records: Sequence[AuditRecord]) -> list[Exception | None]:
        await asyncio.sleep(self.delay)
        if self.failing:
            raise OSError("disk on fire")
        self.batches.append([r.request_id for r in records])
        return [None] * len(records)


def test_concurrent_writes_share_batches_and_all_land() -> None:
    store = SlowStore()
    written: list[int] = []

    async def main() -> GroupCommitWriter:
        writer = GroupCommitWriter(store.insert, on_written=written.append)
        await writer.start()
        await asyncio.gather(*(writer.write(audit_record(f"r{i}")) for i in range(200)))
        await writer.close()
        return writer

    writer = asyncio.run(main())
    stored = [rid for batch in store.batches for rid in batch]
    assert sorted(stored) == sorted(f"r{i}" for i in range(200))
    assert len(store.batches) < 20  # 200 records, far fewer inserts
    assert writer.batches == len(store.batches)
    assert sum(written) == 200


def test_failed_batch_raises_for_every_waiter_and_counts() -> None:
    store = SlowStore()
    store.failing = True
    failed: list[int] = []

    async def main() -> list[object]:
        writer = GroupCommitWriter(store.insert, on_failed=failed.append)
        await writer.start()
        results = await asyncio.gather(
            *(writer.write(audit_record(f"r{i}")) for i in range(5)), return_exceptions=True
        )
        await writer.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, AuditUnavailable) for r in results)
    assert sum(failed) == 5


def test_async_mode_returns_at_once_and_close_flushes_everything() -> None:
    store = SlowStore(delay=0.05)

    async def main() -> float:
        writer = GroupCommitWriter(store.insert, wait=False)
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
    assert sum(len(b) for b in store.batches) == 100


def test_async_mode_retries_until_the_store_is_back() -> None:
    store = SlowStore(delay=0.0)
    store.failing = True

    async def main() -> None:
        writer = GroupCommitWriter(store.insert, wait=False, retry_delay=0.05)
        await writer.start()
        for i in range(10):
            await writer.write(audit_record(f"r{i}"))
        await asyncio.sleep(0.2)
        store.failing = False
        await asyncio.sleep(0.2)
        await writer.close()

    asyncio.run(main())
    assert sorted(rid for batch in store.batches for rid in batch) == sorted(
        f"r{i}" for i in range(10)
    )


def test_records_the_store_never_took_are_logged_not_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SlowStore(delay=0.0)
    store.failing = True
    caplog.set_level(logging.ERROR)

    async def main() -> None:
        writer = GroupCommitWriter(store.insert, wait=False, retry_delay=0.01)
        await writer.start()
        await writer.write(audit_record("r7"))
        await asyncio.sleep(0.05)
        await writer.close()

    asyncio.run(main())
    assert any('"request_id":"r7"' in r.getMessage() for r in caplog.records)


def test_stdout_gets_one_json_line_per_stored_record() -> None:
    store = SlowStore(delay=0.0)
    out = io.StringIO()

    async def main() -> None:
        writer = GroupCommitWriter(store.insert, stdout=out)
        await writer.start()
        await asyncio.gather(*(writer.write(audit_record(f"r{i}")) for i in range(3)))
        await writer.close()

    asyncio.run(main())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(line["request_id"] for line in lines) == ["r0", "r1", "r2"]
    assert lines[0]["ts"].endswith("Z")


def test_writes_after_close_are_refused() -> None:
    async def main() -> None:
        writer = GroupCommitWriter(SlowStore().insert)
        await writer.start()
        await writer.close()
        with pytest.raises(AuditUnavailable):
            await writer.write(audit_record("r1"))

    asyncio.run(main())
