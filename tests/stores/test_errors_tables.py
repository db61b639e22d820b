"""Each store's table of its driver's errors: what /readyz says, what is retried, what
opens the breaker. Real driver exceptions, as pymongo and sqlite3 raise them."""

from __future__ import annotations

import sqlite3

import pytest
from pymongo.errors import (
    AutoReconnect,
    DuplicateKeyError,
    NetworkTimeout,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
)

from vault.errors import StoreUnavailable
from vault.stores.health import DISK_FULL, REFUSING_WRITES, UNREACHABLE
from vault.stores.mongo import errors as mongo_errors
from vault.stores.sqlite import errors as sqlite_errors


@pytest.mark.parametrize(
    ("error", "outage", "down", "reason"),
    [
        (AutoReconnect("connection reset"), True, True, UNREACHABLE),
        (ServerSelectionTimeoutError("no primary"), True, True, UNREACHABLE),
        (NetworkTimeout("timed out"), True, True, UNREACHABLE),
        (WriteConcernError("waiting for replication"), True, False, REFUSING_WRITES),
        (OperationFailure("out of disk space", code=14031), False, False, DISK_FULL),
        (DuplicateKeyError("E11000", code=11000), False, False, REFUSING_WRITES),
    ],
)
def test_mongo_errors_map_by_type_and_code(
    error: Exception, outage: bool, down: bool, reason: str
) -> None:
    assert mongo_errors.is_unavailable(error) is outage
    assert mongo_errors.is_down(error) is down
    if outage:
        mapped = mongo_errors.mapped_unavailable(error)
        assert isinstance(mapped, StoreUnavailable)
        assert mapped.reason == reason
    else:
        assert mongo_errors.readiness_reason(error) == reason


def test_sqlite_errors_map_by_their_error_name_not_their_text() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("PRAGMA max_page_count = 1")  # the next page it needs: SQLITE_FULL
    with pytest.raises(sqlite3.OperationalError) as full:
        conn.execute("INSERT INTO t VALUES (randomblob(100000))")
    assert full.value.sqlite_errorname == "SQLITE_FULL"
    assert sqlite_errors.mapped_unavailable(full.value).reason == DISK_FULL
    with pytest.raises(sqlite3.OperationalError) as missing:
        conn.execute("SELECT * FROM absent")
    assert sqlite_errors.mapped_unavailable(missing.value).reason == REFUSING_WRITES
