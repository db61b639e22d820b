"""A secret's rules on read: who may see it, expiry, read limits, and what a fetch answers.

Pure domain: no I/O, nothing from Starlette, a database driver or Prometheus. The stores
call these rules in their thread, on the record they just read, so that a fetch's read,
the read it takes and its audit record stay one store call; the routes turn the verdict
into an HTTP answer on the event loop.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, replace
from typing import Protocol

from vault.records import DEFAULT_TENANT, Receipt, ReceiptState, SealedSecret, receipt_key


def utc_now() -> dt.datetime:
    """The service's clock: UTC, aware. Expiry is decided against it, on read as well."""
    return dt.datetime.now(dt.UTC)


class Opener(Protocol):
    """What opens a sealed record: the keyring (vault/crypto.py)."""

    def open(self, sealed: SealedSecret) -> bytes:
        """The plaintext; raises when no configured key opens the record."""

    def open_locked(self, sealed: SealedSecret, key: bytes) -> bytes | None:
        """The plaintext of a secret under a passphrase, with ``key`` derived from it; None
        when ``key`` is not its passphrase's; raises as ``open`` does."""


@dataclass(frozen=True, slots=True)
class Passphrase:
    """What a fetch brings for a secret under a passphrase: that one was given (``key``
    None: not derived yet, as the derivation is the record's ``kdf``), or the ``key``
    derived from it with ``kdf``; and the wrong tries after which the secret is deleted."""

    key: bytes | None = None
    kdf: str | None = None
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: the tenant and name of the request's API key (name None without keys)."""

    tenant: str = DEFAULT_TENANT
    name: str | None = None


ANYONE = Caller()  # the caller of a server without API keys


class Denied(enum.Enum):
    """Why a caller may not see a secret (the reason counted in the metrics)."""

    TENANT = "tenant"  # the secret belongs to another tenant
    READERS = "readers"  # made for named readers, and the caller is none of them


class Guarded(Protocol):
    """Who may see a record: a SealedSecret, or what a store read of one for a delete."""

    @property
    def tenant(self) -> str: ...
    @property
    def owner(self) -> str | None: ...
    @property
    def readers(self) -> tuple[str, ...] | None: ...


def denied(record: Guarded, caller: Caller, op: str) -> Denied | None:
    """Why ``caller`` may not ``op`` (fetch or delete) ``record``, or None when it may.

    A secret made for named readers is fetched by them only, and deleted by them or the
    key that made it; any other is open to every key of its tenant."""
    if record.tenant != caller.tenant:
        return Denied.TENANT
    if record.readers is None:
        return None
    if caller.name is not None and (
        caller.name in record.readers or (op == "delete" and caller.name == record.owner)
    ):
        return None
    return Denied.READERS


class Found(enum.Enum):
    """What a fetch found, with the status and audit outcome it answers."""

    SECRET = (200, "success")
    MISSING = (404, "not_found")  # never issued, deleted, reads used up
    EXPIRED = (404, "expired")  # still stored until the purge, never served
    DENIED = (404, "denied")  # not this caller's to see: answered exactly as MISSING
    PASSPHRASE = (403, "denied")  # under a passphrase, asked without it or with a wrong one
    # Under a passphrase, which was given: nothing answered yet; the caller derives the key
    # (the record's ``kdf``, slow on purpose, so never in a store call) and asks again.
    UNLOCK = (0, "unlock")

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
    denied: Denied | None = None
    # PASSPHRASE: whether a passphrase was given (and is wrong), and once the store counted
    # that try, the tries left before the secret is deleted (0: this try deleted it).
    wrong: bool = False
    tries_left: int | None = None


def unlocks(record: SealedSecret, passphrase: Passphrase | None, opener: Opener) -> bool:
    """Whether a fetch may have ``record``: it has no passphrase, or the key brought opens
    it and its wrong tries have not reached the limit."""
    if record.kdf is None:
        return True
    if passphrase is None or passphrase.key is None or passphrase.kdf != record.kdf:
        return False
    if record.passphrase_failures >= passphrase.max_attempts:
        return False
    return opener.open_locked(record, passphrase.key) is not None


def takes_a_read(
    record: SealedSecret | Exception | None,
    now: dt.datetime,
    caller: Caller = ANYONE,
    passphrase: Passphrase | None = None,
    opener: Opener | None = None,
) -> bool:
    """Whether ``caller`` reading ``record`` takes one of its reads: it has a read limit,
    has not expired, is the caller's to see and, under a passphrase, ``passphrase`` opens
    it (a refusal never spends a read)."""
    return (
        isinstance(record, SealedSecret)
        and record.reads_left is not None
        and not record.expired(now)
        and denied(record, caller, "fetch") is None
        and (record.kdf is None or (opener is not None and unlocks(record, passphrase, opener)))
    )


def judge_fetch(
    record: SealedSecret | None,
    now: dt.datetime,
    opener: Opener,
    caller: Caller = ANYONE,
    passphrase: Passphrase | None = None,
) -> Fetched:
    """The verdict on the record a fetch read (for a read-limited one, after its read was
    taken). A record no configured key opens raises: that request fails (500) alone.
    A record that is not the caller's to see is refused before its expiry is looked at,
    so the refusal says nothing about it; an expired one is gone before its passphrase is
    asked for. A secret whose wrong tries reached the limit is gone (its deletion may
    still be on its way)."""
    if record is None:
        return Fetched(Found.MISSING)
    refused = denied(record, caller, "fetch")
    if refused is not None:
        return Fetched(Found.DENIED, denied=refused)
    if record.expired(now):
        return Fetched(Found.EXPIRED)
    if record.kdf is None:
        return Fetched(Found.SECRET, record, opener.open(record))
    if passphrase is not None and record.passphrase_failures >= passphrase.max_attempts:
        return Fetched(Found.MISSING)
    if passphrase is None or passphrase.key is None or passphrase.kdf != record.kdf:
        # The master key's layer first: a record no configured key opens, or whose marker
        # was edited (it is in the associated data), fails here as any unreadable record
        # does, before a derivation (a fifth of a second, 32 MiB) is spent on it.
        opener.open(record)
        if passphrase is None:
            return Fetched(Found.PASSPHRASE, record)
        return Fetched(Found.UNLOCK, record)
    plaintext = opener.open_locked(record, passphrase.key)
    if plaintext is None:
        return Fetched(Found.PASSPHRASE, record, wrong=True)
    return Fetched(Found.SECRET, record, plaintext)


@dataclass(frozen=True, slots=True)
class ReceiptChange:
    """What a store call writes to a receipt: a read served at ``at`` (``used_up`` when it
    took the last read), or the secret's end (``ended``: a ReceiptState) at ``at``."""

    receipt_key: str
    at: dt.datetime
    read: bool = False
    used_up: bool = False
    ended: str | None = None
    failed: bool = False  # a wrong passphrase tried (with ``ended`` when it deleted it)


def receipt_read(fetched: Fetched, now: dt.datetime) -> ReceiptChange | None:
    """The receipt's change for a fetch's verdict: a served read of a secret with a
    receipt (the last one ends it), a wrong passphrase counted (the last one ends it
    too, deleted), else nothing."""
    record = fetched.record
    if record is None or record.receipt_id is None:
        return None
    if fetched.found is Found.PASSPHRASE and fetched.tries_left is not None:
        ended = ReceiptState.DELETED if fetched.tries_left == 0 else None
        return ReceiptChange(receipt_key(record.receipt_id), now, failed=True, ended=ended)
    if fetched.found is not Found.SECRET:
        return None
    used_up = record.reads_left == 0
    return ReceiptChange(receipt_key(record.receipt_id), now, read=True, used_up=used_up)


def receipt_as_of(receipt: Receipt, now: dt.datetime) -> Receipt:
    """The receipt as it stands at ``now``: an active secret past its expiry is expired
    since ``expires_at``, whether or not the purge has removed it yet."""
    if (
        receipt.state == ReceiptState.ACTIVE
        and receipt.expires_at is not None
        and now >= receipt.expires_at
    ):
        return replace(receipt, state=ReceiptState.EXPIRED, ended_at=receipt.expires_at)
    return receipt


def receipt_kept(receipt: Receipt, now: dt.datetime, retention_seconds: float) -> bool:
    """Whether a receipt still answers at ``now``: until ``retention_seconds`` after the
    end of its secret (an active secret's receipt always answers)."""
    ended_at = receipt_as_of(receipt, now).ended_at
    return ended_at is None or now < ended_at + dt.timedelta(seconds=retention_seconds)
