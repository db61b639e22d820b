"""The small storage interface the routes depend on, and the errors a store raises.

A store only ever sees sealed records (vault/records.py): nonce, ciphertext and key id,
never plaintext.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import enum
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

from observability.metrics import observe_store_operation
from observability.tracing import store_span
from vault.records import AuditNote, SealedSecret, StoredSecret

T = TypeVar("T")
A = TypeVar("A")

# An audit record as a store takes it: a plain mapping with these keys, so the stores need
# nothing from the middleware that makes the records. ``ts`` is an aware datetime, ``status``
# an int, ``latency_ms`` a float, ``secret_id_hmac``/``user_agent``/``api_key_name`` a str or
# None, the rest str. ``record_id`` (24 hex digits, an ObjectId's) is fixed when the record
# is made, so a record written twice (a retry whose first attempt landed) is stored once.
AUDIT_FIELDS = (
    "ts",
    "op",
    "status",
    "outcome",
    "client_ip",
    "request_id",
    "secret_id_hmac",
    "latency_ms",
    "user_agent",
    "api_key_name",
    "record_id",
)
AuditDocument = Mapping[str, Any]


# What a fetch answers for the record found (None when there is none), and the note to
# write beside it; run in the store's thread, right after the read.
Answer = Callable[[SealedSecret | None], tuple[A, AuditNote | None]]


class CorruptRecord(Exception):
    """A stored record lacks a field or holds one of the wrong type (edited outside the
    service): its own request gets 500; requests read in the same call are unaffected."""


class StoreUnavailable(Exception):
    """The store did not answer in time or refused the connection; the caller may retry.

    ``reason``, set where a driver's error is mapped when the store can tell, is what a
    write failing with it means for /readyz (one of ``vault.stores.health.REASONS``);
    None when the store cannot tell (a call that ran out of its budget, say).
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason

    @classmethod
    def after(cls, timeout: float | None) -> StoreUnavailable:
        """The error for a store call, or a wait for one, that ran out of its budget."""
        return cls(f"store did not answer within {timeout:g}s")


class StoreKnownDown(StoreUnavailable):
    """Refused without trying: the store's circuit breaker knows it is down. The breaker
    logs the outage once (opened, answering again); each refusal is only counted."""


class DeleteResult(enum.Enum):
    """What a delete found."""

    DELETED = "deleted"
    EXPIRED = "expired"
    MISSING = "missing"


def utc_now() -> dt.datetime:
    """The store's clock: UTC, aware. Expiry is decided against it, on read as well."""
    return dt.datetime.now(dt.UTC)


class SecretStore(Protocol):
    """What the routes need from a store. Every method runs its I/O off the event loop."""

    async def open(self) -> None:
        """Prepare resources (thread pool, schema). Must not fail if the store is down."""

    async def close(self) -> None:
        """Release connections."""

    async def insert(self, record: SealedSecret, audit: AuditNote | None = None) -> None:
        """Durably store a new record; return only once it would survive a crash. With
        ``audit``, its note is written in the same call once the record is stored (SQLite:
        the same transaction), and told how that went."""

    async def get(self, secret_id: str) -> SealedSecret | None:
        """The record with this id, or None; expired or used-up records are returned too
        (the caller decides, with its clock, and tells them apart in the audit log)."""

    async def read(self, secret_id: str, answer: Answer[A]) -> A:
        """A fetch's whole store work in one call. The record is read; a read-limited one
        not expired at the store's clock then has one read taken (``takes_a_read``),
        exactly as ``consume`` takes it, and ``answer`` sees what ``consume`` returns.
        ``answer(record)`` runs in the store's thread right after, and the note it returns
        (if any) is written before the call returns (on SQLite in the same transaction as
        the read taken). ``answer``'s exception is raised to the caller, and no note is
        written for it."""

    async def consume(self, secret_id: str) -> SealedSecret | None:
        """Atomically take one read of a read-limited record and return it with the reads
        left after this one; None when it is gone or its reads are used up. The read that
        leaves none deletes the record before returning. Exact under any concurrency, across
        processes and replicas sharing the store."""

    async def delete(self, secret_id: str) -> DeleteResult:
        """Remove the record (the row or document, not a flag): ``deleted``, ``expired``
        (it was there but past its expiry, and is removed all the same), or ``missing``
        (none, or its reads were used up)."""

    async def purge_expired(self) -> int:
        """Remove the records past their expiry (and any whose reads are used up); the
        count removed. Called at start and every SECRET_PURGE_INTERVAL_SECONDS."""

    async def ping(self) -> None:
        """Return if the store answers and writes work (vault/stores/health.py), else raise
        StoreUnavailable (vault.stores.health.NotReady, naming the reason, for failing
        writes). May write harmless readiness records, never a secret, at most once a
        second: while writes fail, as large as the largest create."""

    async def insert_audit(self, document: AuditDocument) -> Exception | None:
        """Durably store one audit record (``AUDIT_FIELDS``); concurrent calls share one
        write (group commit). None once stored (a record_id already stored counts), else the
        error this record alone failed with, which a retry would meet again. Raises
        StoreUnavailable when the write failed as a whole: a retry may succeed."""

    async def apply_audit_retention(self, ttl_days: int) -> None:
        """Keep audit records ``ttl_days`` days (0: forever); called at start and hourly."""

    # Key rotation (``secret-manager rewrap``); never called by the routes.

    async def prepare_rewrap(self) -> None:
        """Build what paging by key id needs (an index), once; idempotent, may take a while."""

    async def records_not_sealed_by(
        self, key_id: str, after_secret_id: str, limit: int
    ) -> list[SealedSecret]:
        """Up to ``limit`` records sealed by any key but ``key_id``, with ids above
        ``after_secret_id``, in ascending secret id order: a stable order to page through."""

    async def replace_sealed(self, old: SealedSecret, new: SealedSecret) -> bool:
        """Atomically replace record ``old`` by ``new`` (same secret id, durably written) if
        it still holds ``old``'s key id and nonce. False, and nothing written, if it changed."""

    async def count_not_sealed_by(self, key_id: str) -> int:
        """How many records are sealed by any key but ``key_id``."""

    # The key guard (vault/keyguard.py): at start-up and periodically while serving.

    async def unknown_key_counts(self, known_key_ids: Collection[str]) -> dict[str, int]:
        """For each key id that seals a live record (not expired, reads not used up) and is
        not in ``known_key_ids``: how many live records it seals. Found through the key id
        index (distinct ids by index seeks, then a count per unknown id), never a scan."""


class Imported(enum.Enum):
    """What importing one secret record did to the store."""

    NEW = "new"  # stored: the store had no record under its id
    PRESENT = "present"  # the store holds this very record already: nothing written
    FEWER_READS = "fewer_reads"  # held already, with more reads left: lowered to the file's
    CONFLICT = "conflict"  # the store holds a different record under its id: left untouched


class BulkStore(Protocol):
    """Whole-store reads and writes for ``secret-manager export`` and ``import``.

    Synchronous, on a connection of its own (a command, not a request path). Records go
    in and out sealed, exactly as stored: no master key is needed.
    """

    label: str  # names the store in messages: "SQLite file 'data/vault.db'"

    def close(self) -> None:
        """Release the connection."""

    def snapshot(self) -> AbstractContextManager[None]:
        """Reads inside see one instant of the store where it can offer that (SQLite);
        elsewhere each record is read whole, and records written meanwhile may be missed."""

    def count_secrets(self) -> int:
        """How many secret records the store holds (an estimate of what an export carries)."""

    def count_audit(self) -> int:
        """How many audit records the store holds."""

    def secrets(self, now: dt.datetime) -> Iterator[StoredSecret]:
        """Every record neither expired at ``now`` nor used up, in secret id order, each
        whole. Streamed: memory does not grow with the store."""

    def audit(self) -> Iterator[dict[str, Any]]:
        """Every audit record as a document with ``AUDIT_FIELDS``; ``record_id`` is always
        set (derived from the record's content where an old row has none)."""

    def add_secrets(self, records: Sequence[StoredSecret]) -> list[Imported]:
        """Store the records the store does not hold, durably, in one transaction or batch;
        one outcome per record, in order. Never raises a record's read count."""

    def add_audit(self, documents: Iterable[Mapping[str, Any]]) -> int:
        """Store the audit records whose ``record_id`` is not stored yet; how many were new."""


def same_secret(stored: SealedSecret, incoming: SealedSecret) -> bool:
    """The same record, whatever reads it has had since: sealed alike, same expiry, and a
    read limit on both or on neither."""
    return (
        stored.key_id == incoming.key_id
        and stored.nonce == incoming.nonce
        and stored.ciphertext == incoming.ciphertext
        and stored.expires_at == incoming.expires_at
        and (stored.reads_left is None) == (incoming.reads_left is None)
    )


def import_outcome(stored: SealedSecret | None, incoming: SealedSecret) -> Imported:
    """What importing ``incoming`` does where the store holds ``stored`` under its id."""
    if stored is None:
        return Imported.NEW
    if not same_secret(stored, incoming):
        return Imported.CONFLICT
    if (
        incoming.reads_left is not None
        and stored.reads_left is not None
        and incoming.reads_left < stored.reads_left
    ):
        return Imported.FEWER_READS  # taken since: a read is never given back
    return Imported.PRESENT


def derived_record_id(document: Mapping[str, Any]) -> str:
    """A stable ``record_id`` for an audit record stored before records carried one: the
    first 24 hex digits of a SHA-256 of its fields, so every export names it alike."""
    fields = {name: str(document.get(name)) for name in AUDIT_FIELDS if name != "record_id"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:24]


def store_executor(threads: int, name: str) -> ThreadPoolExecutor:
    """A store's own thread pool: as many threads as it has connections, and no more."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)


async def run_off_loop(
    func: Callable[..., T],
    *args: object,
    executor: ThreadPoolExecutor,
    timeout: float,
    operation: str,
    system: str,
) -> T:
    """Run blocking store I/O in the store's thread pool, giving up after ``timeout`` seconds.

    The caller is answered in bounded time even when the database hangs: a call still queued
    is cancelled, one already running is abandoned (its driver's own timeouts end it), and
    the request gets StoreUnavailable. The pool is the event loop's own executor machinery
    rather than anyio's to_thread, which costs about three times the CPU per call.
    """
    started = time.perf_counter()
    try:
        with store_span(operation, system=system):
            # The thread runs in a copy of this context, so driver spans nest under ours.
            call = functools.partial(contextvars.copy_context().run, func, *args)
            async with asyncio.timeout(timeout):
                return await asyncio.get_running_loop().run_in_executor(executor, call)
    except TimeoutError:
        raise StoreUnavailable.after(timeout) from None
    finally:
        observe_store_operation(operation, time.perf_counter() - started)


async def stored_or_refused(write: Awaitable[object]) -> Exception | None:
    """Await one record's batched write: None once stored, the record's own error when the
    store refused it alone; StoreUnavailable (the whole write failed) is raised."""
    try:
        await write
    except StoreUnavailable:
        raise
    except Exception as exc:  # set by the batch call for this record alone
        return exc
    return None


def takes_a_read(record: SealedSecret | Exception | None) -> bool:
    """Whether reading ``record`` takes one of its reads: it has a read limit and has not
    expired (an expired one is refused without spending a read)."""
    return (
        isinstance(record, SealedSecret)
        and record.reads_left is not None
        and not record.expired(utc_now())
    )


def answer_each(
    items: Sequence[tuple[str, Answer[A]]], records: Sequence[SealedSecret | Exception | None]
) -> tuple[list[A | Exception], list[AuditNote]]:
    """Run each read's ``answer`` on the record found for it (``records``, in the same
    order): one result per item (the answer, or the exception that item alone failed with:
    a corrupt record's, or its answer's), and the notes to write beside them."""
    results: list[A | Exception] = []
    notes: list[AuditNote] = []
    for (_, answer), record in zip(items, records, strict=True):
        if isinstance(record, Exception):
            results.append(record)
            continue
        try:
            value, note = answer(record)
        except Exception as exc:  # this request's own failure (a record no key opens)
            results.append(exc)
            continue
        results.append(value)
        if note is not None:
            notes.append(note)
    return results, notes


def notes_of_stored(
    items: Iterable[tuple[object, AuditNote | None]], results: Iterable[Exception | None]
) -> list[AuditNote]:
    """The audit notes of a batch's items whose own record was stored (result None)."""
    return [
        note
        for (_, note), error in zip(items, results, strict=True)
        if note is not None and error is None
    ]


def note_documents(
    notes: Iterable[AuditNote],
    convert: Callable[[Mapping[str, Any]], T],
    malformed: tuple[type[Exception], ...],
) -> tuple[list[AuditNote], list[T]]:
    """Each note's record in the store's form (``convert``), beside the notes they belong
    to; a note whose record is malformed (``convert`` raised one of ``malformed``) is
    refused alone, and told so at once."""
    ready: list[AuditNote] = []
    converted: list[T] = []
    for note in notes:
        try:
            converted.append(convert(note.document()))
        except malformed as exc:
            note.written(exc)
        else:
            ready.append(note)
    return ready, converted


def unavailable(exc: Exception) -> StoreUnavailable:
    """A whole batch call's failure as StoreUnavailable, so that each waiter can tell it
    from a refusal of its own record (any other exception)."""
    if isinstance(exc, StoreUnavailable):
        return exc
    return StoreUnavailable(type(exc).__name__)
