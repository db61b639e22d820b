"""A secret's lifecycle rules on read: expiry, read limits, and what a fetch answers.

Pure domain: no I/O, nothing from Starlette, a database driver or Prometheus. The stores
call these rules in their thread, on the record they just read, so that a fetch's read,
the read it takes and its audit record stay one store call; the routes turn the verdict
into an HTTP answer on the event loop.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Protocol

from vault.records import SealedSecret


def utc_now() -> dt.datetime:
    """The service's clock: UTC, aware. Expiry is decided against it, on read as well."""
    return dt.datetime.now(dt.UTC)


class Opener(Protocol):
    """What opens a sealed record: the keyring (vault/crypto.py)."""

    def open(self, sealed: SealedSecret) -> bytes:
        """The plaintext; raises when no configured key opens the record."""


class Found(enum.Enum):
    """What a fetch found, with the status and audit outcome it answers."""

    SECRET = (200, "success")
    MISSING = (404, "not_found")  # never issued, deleted, reads used up
    EXPIRED = (404, "expired")  # still stored until the purge, never served

    def __init__(self, status: int, outcome: str) -> None:
        self.status = status
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Fetched:
    """A fetch's verdict: what was found and, for a secret, its plaintext and its record
    (with the reads left after this read, for a read-limited one)."""

    found: Found
    record: SealedSecret | None = None
    plaintext: bytes | None = None


def takes_a_read(record: SealedSecret | Exception | None, now: dt.datetime) -> bool:
    """Whether reading ``record`` takes one of its reads: it has a read limit and has not
    expired (an expired one is refused without spending a read)."""
    return (
        isinstance(record, SealedSecret)
        and record.reads_left is not None
        and not record.expired(now)
    )


def judge_fetch(record: SealedSecret | None, now: dt.datetime, opener: Opener) -> Fetched:
    """The verdict on the record a fetch read (for a read-limited one, after its read was
    taken). A record no configured key opens raises: that request fails (500) alone."""
    if record is None:
        return Fetched(Found.MISSING)
    if record.expired(now):
        return Fetched(Found.EXPIRED)
    return Fetched(Found.SECRET, record, opener.open(record))
