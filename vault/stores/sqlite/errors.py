"""sqlite3's errors mapped onto vault.errors, in one table.

Any ``sqlite3.OperationalError`` is an outage from the caller's view (locked, read-only,
out of disk, unreadable): StoreUnavailable, answered 503, worth a retry. Its error name
(``sqlite_errorname``, never its message text) says what it means for /readyz.
"""

from __future__ import annotations

import sqlite3

from vault.errors import StoreUnavailable
from vault.stores.health import DISK_FULL, REFUSING_WRITES

# What a write failing with an error of this name means for /readyz; any other name:
# REFUSING_WRITES.
REASONS_BY_NAME = {"SQLITE_FULL": DISK_FULL}


def mapped_unavailable(exc: sqlite3.OperationalError) -> StoreUnavailable:
    """An OperationalError as StoreUnavailable, with its reason for /readyz."""
    name = exc.sqlite_errorname
    return StoreUnavailable(f"sqlite: {name}", reason=REASONS_BY_NAME.get(name, REFUSING_WRITES))


def readiness_reason(exc: Exception) -> str:
    """What /readyz says when a write failed with ``exc`` that carries no reason of its own
    (it ran out of its time budget, or failed unexpectedly)."""
    return REFUSING_WRITES
