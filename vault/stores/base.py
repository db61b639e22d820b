"""The small storage interface the routes depend on, and the errors a store raises.

A store only ever sees sealed records (vault/records.py): nonce, ciphertext and key id,
never plaintext. It stores each under its record key, the digest of its secret id; a fetch
or delete is handed the id itself, to look the record up under its digest or, for a legacy
record, under the id, and never writes it.
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
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, NamedTuple, Protocol, TypeVar

from observability.audit import AUDIT_FIELDS, AuditRecord, AuditWrite
from observability.metrics import observe_store_operation
from observability.tracing import store_span
from vault import events
from vault.errors import StoreUnavailable, VaultError
from vault.events import Actor, Event, PendingEvent, secret_event
from vault.lifecycle import (
    ANYONE,
    Caller,
    Denied,
    Fetched,
    Found,
    Guarded,
    Opener,
    Passphrase,
    ReceiptChange,
    denied,
    judge_fetch,
    receipt_read,
    takes_a_read,
    utc_now,
)
from vault.records import (
    IdempotentCreate,
    Receipt,
    ReceiptState,
    SealedSecret,
    StoredSecret,
    keyed_by_id,
    receipt_key,
    record_key,
)
from vault.stores.batching import Batcher
from vault.stores.threads import StoreThreads

# Re-exported: the vocabulary of the stores and of transfer.
__all__ = ["AUDIT_FIELDS", "AuditWrite", "utc_now"]

T = TypeVar("T")

# An audit record as a bulk transfer (export, import) carries it: a plain mapping with
# ``AUDIT_FIELDS``. On the request path the stores take the ``AuditRecord`` itself.
AuditDocument = Mapping[str, Any]


# A fetch's outcome from its store call: the verdict, and its audit record's write.
FetchResult = tuple[Fetched, AuditWrite | None]


class FetchItem(NamedTuple):
    """One fetch as a store batches it: the id, what opens its record, the audit record to
    write for its answer, who asks, who the events name (None: no events wanted), and
    the passphrase it brings (None: none given)."""

    secret_id: str
    opener: Opener
    audit: AuditRecord | None
    caller: Caller
    actor: Actor | None = None
    passphrase: Passphrase | None = None

    def takes_a_read(self, record: SealedSecret | Exception | None, now: dt.datetime) -> bool:
        """Whether this fetch takes one of ``record``'s reads (``lifecycle.takes_a_read``)."""
        return takes_a_read(record, now, self.caller, self.passphrase, self.opener)


def record_event(type: str, record: SealedSecret, at: dt.datetime, actor: Actor | None) -> Event:
    """The event ``type`` of a change to ``record``."""
    return secret_event(
        type,
        at,
        tenant=record.tenant,
        receipt_id=record.receipt_id,
        label=record.label,
        reads_left=record.reads_left,
        expires_at=record.expires_at,
        actor=actor,
    )


def fetch_events(
    items: Sequence[FetchItem],
    records: Sequence[SealedSecret | Exception | None],
    results: Sequence[Fetched | Exception],
    now: dt.datetime,
    types: Collection[str],
) -> list[Event]:
    """The events of a batch of fetch verdicts on the ``records`` read, of the ``types``
    wanted: a read served (and, for the last read, the secret used up), or a refusal (whose
    verdict carries nothing of the record, so its event is made from what was read)."""
    found: list[Event] = []
    if not types:
        return found
    for item, read, result in zip(items, records, results, strict=True):
        if not isinstance(result, Fetched) or not isinstance(read, SealedSecret):
            continue
        record = result.record or read
        if result.found is Found.DENIED:
            wanted = [events.DENIED]
        elif result.found is Found.PASSPHRASE:  # missing, or wrong and counted
            wanted = [events.DENIED, *([events.DELETED] if result.tries_left == 0 else [])]
        elif result.found is Found.SECRET:
            wanted = [events.READ, *([events.USED_UP] if record.reads_left == 0 else [])]
        else:
            continue
        found += [record_event(t, record, now, item.actor) for t in wanted if t in types]
    return found


class IdempotentRepeat(VaultError):
    """A create whose Idempotency-Key is already stored: ``existing`` is what the first
    create with it stored. Nothing of this create was written."""

    def __init__(self, existing: IdempotentCreate) -> None:
        super().__init__("a create with this Idempotency-Key is already stored")
        self.existing = existing


class DeleteResult(enum.Enum):
    """What a delete found."""

    DELETED = "deleted"
    EXPIRED = "expired"
    MISSING = "missing"
    # There, and left there: not the caller's to delete (answered exactly as MISSING).
    DENIED_TENANT = "denied_tenant"
    DENIED_READERS = "denied_readers"

    @property
    def denied(self) -> Denied | None:
        """Why the caller was refused, for a refusal."""
        return _DENIALS.get(self)


_DENIALS = {DeleteResult.DENIED_TENANT: Denied.TENANT, DeleteResult.DENIED_READERS: Denied.READERS}


def judge_delete(
    found: tuple[Guarded, dt.datetime | None, int | None] | None,
    caller: Caller,
    now: dt.datetime,
) -> DeleteResult:
    """What a delete answers ``caller`` for what the store found under the id: who may see
    the record, its expiry and its reads left (None: nothing). The store removes the
    record for DELETED and EXPIRED only. A refusal is decided before the expiry is looked
    at, and a used-up record is missing for everyone, so a refusal tells nothing."""
    if found is None:
        return DeleteResult.MISSING
    guard, expires_at, reads_left = found
    if reads_left == 0:
        return DeleteResult.MISSING
    refused = denied(guard, caller, "delete")
    if refused is Denied.TENANT:
        return DeleteResult.DENIED_TENANT
    if refused is Denied.READERS:
        return DeleteResult.DENIED_READERS
    if expires_at is not None and now >= expires_at:
        return DeleteResult.EXPIRED
    return DeleteResult.DELETED


def receipt_changes(
    results: Sequence[Fetched | Exception], now: dt.datetime
) -> list[ReceiptChange]:
    """The receipts' changes for a batch of fetch verdicts: one per read served of a
    secret with a receipt, and per wrong passphrase counted."""
    changes = []
    for result in results:
        if isinstance(result, Fetched):
            change = receipt_read(result, now)
            if change is not None:
                changes.append(change)
    return changes


def delete_changes(
    receipt_id: object, expires_at: dt.datetime | None, result: DeleteResult, now: dt.datetime
) -> list[ReceiptChange]:
    """The receipt's change for a delete that removed a secret with a receipt: deleted
    now, or, for one found past its expiry, expired when it expired."""
    if not isinstance(receipt_id, str):
        return []
    key = receipt_key(receipt_id)
    if result is DeleteResult.DELETED:
        return [ReceiptChange(key, now, ended=ReceiptState.DELETED)]
    if result is DeleteResult.EXPIRED:
        return [ReceiptChange(key, expires_at or now, ended=ReceiptState.EXPIRED)]
    return []


def delete_events(
    result: DeleteResult,
    now: dt.datetime,
    actor: Actor | None,
    types: Collection[str],
    **seen: Any,
) -> list[Event]:
    """The event of a delete's verdict, of the ``types`` wanted: deleted, found expired (at
    its expiry), or refused. ``seen`` is what the store read of the secret: the keywords
    of ``vault.events.secret_event`` (tenant, receipt_id, label, reads_left, expires_at)."""
    if result is DeleteResult.DELETED:
        type, at = events.DELETED, now
    elif result is DeleteResult.EXPIRED:
        type, at = events.EXPIRED, seen.get("expires_at") or now
    elif result.denied is not None:
        type, at = events.DENIED, now
    else:
        return []
    return [secret_event(type, at, actor=actor, **seen)] if type in types else []


class Remaining(NamedTuple):
    """What key rotation has left to do in a store (``secret-manager rewrap``)."""

    records: int  # records a pass takes: sealed by another key, or keyed by their id, or both
    other_keys: int  # of those, sealed by a key other than the active one
    keyed_by_id: int  # of those, stored under their secret id (legacy records)


class Settlement(NamedTuple):
    """What a deliverer made of an event it claimed: with ``next_attempt_at`` None, remove
    it (every receiver has it, or it is dropped); else try it again then, the receivers
    ``delivered_to`` (digests) having it already. Applied only while ``owner`` still holds
    the event's lease."""

    event_id: str
    owner: str
    next_attempt_at: dt.datetime | None = None
    delivered_to: frozenset[str] = frozenset()


class OutboxSettling:
    """The deliverers' three outcomes, the same in both stores: each a Settlement through
    the store's ``_settles`` batcher, so concurrent outcomes share one write."""

    _settles: Batcher[Settlement, bool]

    async def event_delivered(self, event_id: str, owner: str) -> bool:
        done: bool = await self._settles.submit(Settlement(event_id, owner))
        return done

    async def event_failed(
        self,
        event_id: str,
        owner: str,
        next_attempt_at: dt.datetime,
        delivered_to: Collection[str] = (),
    ) -> bool:
        item = Settlement(event_id, owner, next_attempt_at, frozenset(delivered_to))
        done: bool = await self._settles.submit(item)
        return done

    async def drop_event(self, event_id: str, owner: str) -> bool:
        done: bool = await self._settles.submit(Settlement(event_id, owner))
        return done


class SecretStore(Protocol):
    """What the routes need from a store. Every method runs its I/O off the event loop."""

    async def open(self) -> None:
        """Prepare resources (thread pool, schema). Must not fail if the store is down."""

    async def close(self) -> None:
        """Release connections."""

    async def insert(
        self,
        record: SealedSecret,
        audit: AuditRecord | None = None,
        actor: Actor | None = None,
        idempotent: IdempotentCreate | None = None,
    ) -> AuditWrite | None:
        """Durably store a new record; return only once it would survive a crash. With
        ``audit`` (the record of answering 200), it is written in the same call once the
        record is stored (SQLite: the same transaction); the answer says how that went.
        With ``idempotent``, that is stored in the same call, the record only if no create
        with its key is stored yet: else IdempotentRepeat is raised, naming that one, and
        nothing is written."""

    async def fetch(
        self,
        secret_id: str,
        opener: Opener,
        audit: AuditRecord | None = None,
        caller: Caller = ANYONE,
        actor: Actor | None = None,
        passphrase: Passphrase | None = None,
    ) -> FetchResult:
        """A fetch's whole store work in one call. The record is read (``lookup_keys``:
        under its record key, else under the id, a legacy record); a read-limited one
        not expired at the store's clock and ``caller``'s to see then has one read taken
        (one atomic update, exact under any concurrency, across processes and replicas;
        the read that leaves none deletes the record). ``vault.lifecycle.judge_fetch``
        then decides the answer, in the store's thread (so a record ``opener`` cannot
        open fails with no 200 written), and ``audit``, stamped for that answer, is
        written before the call returns (on SQLite in the same transaction as the read
        taken). The verdict's exception (a record no key opens) is raised to the caller,
        and no audit record is written.

        A secret under a passphrase takes a read only when ``passphrase`` brings the key
        that opens it; a wrong key is counted in the same call (one atomic increment; the
        try that reaches ``passphrase.max_attempts`` deletes the record), and a passphrase
        given but not derived yet answers Found.UNLOCK with nothing written."""

    async def delete(
        self, secret_id: str, caller: Caller = ANYONE, actor: Actor | None = None
    ) -> DeleteResult:
        """Remove the record, under either of its ``lookup_keys`` (the row or document, not a
        flag), as ``judge_delete`` decides in the same call: ``deleted``, ``expired``
        (it was there but past its expiry, and is removed all the same), ``missing``
        (none, or its reads were used up), or refused (not ``caller``'s, left as it is)."""

    async def purge_expired(self) -> int:
        """Remove the records past their expiry (and any whose reads are used up); the
        count removed. Called at start and every SECRET_PURGE_INTERVAL_SECONDS."""

    async def purge_idempotency(self) -> int:
        """Remove the idempotent creates' records past their window; the count removed."""

    async def purge_receipts(self, retention_seconds: float) -> int:
        """Remove the receipts ``retention_seconds`` past the end of their secret (or past
        its expiry, for one never seen ending); the count removed. Called with the purge."""

    async def receipt(self, receipt_id: str) -> Receipt | None:
        """The receipt stored for ``receipt_id`` (under its ``receipt_key``), or None."""

    async def ping(self) -> None:
        """Return if the store answers and writes work (vault/stores/health.py), else raise
        StoreUnavailable (NotReady, naming the reason, for failing
        writes). May write harmless readiness records, never a secret, at most once a
        second: while writes fail, as large as the largest create."""

    async def insert_audit(self, record: AuditRecord) -> Exception | None:
        """Durably store one audit record; concurrent calls share one write (group
        commit). None once stored (a record_id already stored counts), else the error this
        record alone failed with, which a retry would meet again. Raises StoreUnavailable
        when the write failed as a whole: a retry may succeed."""

    async def apply_audit_retention(self, ttl_days: int) -> None:
        """Keep audit records ``ttl_days`` days (0: forever); called at start and hourly."""

    # Key rotation (``secret-manager rewrap``); never called by the routes.

    async def prepare_rewrap(self) -> None:
        """Build what paging by key id needs (an index), once; idempotent, may take a while."""

    async def finish_rewrap(self) -> None:
        """Once a pass has written: give back what it leaves behind (SQLite: checkpoint and
        truncate the WAL, so that no page image there still holds a converted record's id)."""

    async def records_to_rewrap(self, key_id: str, after: str, limit: int) -> list[SealedSecret]:
        """Up to ``limit`` records sealed by any key but ``key_id`` or still keyed by their
        id, with record keys above ``after``, in ascending record key order: a stable order
        to page through (a record converted meanwhile no longer matches)."""

    async def replace_sealed(self, old: SealedSecret, new: SealedSecret) -> bool:
        """Atomically replace record ``old`` by ``new`` (same record key, durably written)
        if it still holds ``old``'s key id and nonce. False, and nothing written, if it
        changed."""

    async def convert_sealed(self, old: SealedSecret, new: SealedSecret) -> bool:
        """Move legacy record ``old`` (keyed by its secret id) to ``new``, sealed under its
        record key (``record_key`` of that id), keeping its lifecycle, if it still holds
        ``old``'s key id and nonce; True once the id is no longer stored. A record already
        under the record key wins, and ``old`` is deleted. Safe to repeat after a crash;
        False, and nothing left behind, if the record changed or went meanwhile."""

    async def count_to_rewrap(self, key_id: str) -> Remaining:
        """How many records a pass would take: sealed by any key but ``key_id``, or keyed by
        their id."""

    # The key guard (vault/keyguard.py): at start-up and periodically while serving.

    async def unknown_key_counts(self, known_key_ids: Collection[str]) -> dict[str, int]:
        """For each key id that seals a live record (not expired, reads not used up) and is
        not in ``known_key_ids``: how many live records it seals. Found through the key id
        index (distinct ids by index seeks, then a count per unknown id), never a scan."""

    # The outbox of lifecycle events (vault/events.py), drained by the webhook deliverer
    # (vault/webhooks.py). A request's store call writes its events itself, in its own
    # transaction or batch (documents.py's ``insert_events``).

    async def add_events(self, events: Sequence[Event]) -> None:
        """Durably write ``events`` to the outbox, due at once, in a write of their own (an
        event made outside a request's store call); an event id already stored is left as
        it is. Nothing is written for no events."""

    async def claim_events(
        self, owner: str, now: dt.datetime, lease_seconds: float, limit: int
    ) -> list[PendingEvent]:
        """Up to ``limit`` events due at ``now`` (their next attempt's time has come and no
        deliverer holds a live lease on them), the oldest first, each leased to ``owner``
        until ``now`` + ``lease_seconds`` by one atomic write: across processes and replicas
        one deliverer at a time holds an event. An event whose lease ends unsettled (its
        deliverer died) is due again then. Only a read when nothing is due."""

    async def event_delivered(self, event_id: str, owner: str) -> bool:
        """Every receiver has the event: remove it, if ``owner`` still holds its lease (the
        answer says so; else nothing changes)."""

    async def event_failed(
        self,
        event_id: str,
        owner: str,
        next_attempt_at: dt.datetime,
        delivered_to: Collection[str] = (),
    ) -> bool:
        """A delivery failed: count the attempt, free the lease and make the event due again
        at ``next_attempt_at``, noting the receivers that have it (``delivered_to``, the
        whole set so far), if ``owner`` still holds its lease (the answer says so)."""

    async def drop_event(self, event_id: str, owner: str) -> bool:
        """Remove an event that will not be delivered (too old), if ``owner`` still holds its
        lease: True when this call removed it."""

    async def outbox_backlog(self, now: dt.datetime) -> tuple[int, dt.datetime | None]:
        """How many events the outbox holds (delivered ones leave it), and when the oldest
        was written to it (None: empty), as of ``now``. For a gauge refreshed every few
        seconds: neither reads the events one by one (on MongoDB the count is the
        collection's own, kept with it)."""


class Backend(Protocol):
    """One kind of store, configured: what the command line and the app ask of it before
    and instead of opening it. ``vault.backend.backend_for`` chooses one from the settings,
    the one place that choice is made."""

    @property
    def kind(self) -> str:
        """``mongodb`` or ``sqlite``: how an export names the store it came from."""

    @property
    def label(self) -> str:
        """Names the store in messages: ``SQLite file 'data/vault.db'``."""

    def check(self) -> None:
        """Refuse, offline, a configuration that cannot work: ConfigError naming the
        variable (a MONGO_URI pymongo cannot parse)."""

    def check_writable(self, *, create: bool) -> None:
        """Refuse a store this process could not write: ConfigError naming the variable (a
        DATA_DIR this user cannot write). ``create``: make what must exist (the data
        directory) now, else only check that it could be made."""

    def exists(self) -> bool:
        """Whether the store may hold records already: an SQLite file not made yet holds
        none (and asking must not make it); a MongoDB database always may."""

    def open(self) -> SecretStore:
        """The serving store (not yet opened: ``await store.open()``)."""

    def open_bulk(self, *, create: bool) -> BulkStore:
        """Whole-store access for export and import; ``create`` makes an SQLite file that
        does not exist yet (else FileNotFoundError)."""


class Imported(enum.Enum):
    """What importing one secret record did to the store."""

    NEW = "new"  # stored: the store had no record under its key
    PRESENT = "present"  # the store holds this very record already: nothing written
    FEWER_READS = "fewer_reads"  # held already, with more reads left: lowered to the file's
    # held already (with as many reads left), with fewer wrong passphrase tries: raised
    MORE_FAILURES = "more_failures"
    CONFLICT = "conflict"  # the store holds a different record under its key: left untouched


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

    def count_keyed_by_id(self) -> int:
        """How many records are still stored under their secret id (legacy records, which
        ``rewrap`` converts): an export refuses to write their ids into a file."""

    def secrets(self, now: dt.datetime) -> Iterator[StoredSecret]:
        """Every record neither expired at ``now`` nor used up, in record key order, each
        whole. Streamed: memory does not grow with the store."""

    def audit(self) -> Iterator[dict[str, Any]]:
        """Every audit record as a document with ``AUDIT_FIELDS``; ``record_id`` is always
        set (derived from the record's content where an old row has none)."""

    def add_secrets(self, records: Sequence[StoredSecret]) -> list[Imported]:
        """Store the records the store does not hold, durably, in one transaction or batch;
        one outcome per record, in order. Never raises a record's read count. A legacy
        record (keyed by its id, from an export of format 1) is judged against the record
        stored under its digest, if any (``stored_for``), else stored as it is."""

    def add_audit(self, documents: Iterable[Mapping[str, Any]]) -> int:
        """Store the audit records whose ``record_id`` is not stored yet; how many were new."""

    def count_receipts(self) -> int:
        """How many receipts the store holds."""

    def receipts(self) -> Iterator[Receipt]:
        """Every stored receipt, whether its secret is live or ended, in receipt key order,
        each whole (a document that is not a whole receipt is left out). Streamed."""

    def add_receipts(self, receipts: Sequence[Receipt]) -> int:
        """Store the receipts the store does not hold, durably, in one transaction or
        batch; how many were new. A receipt held already (of the same tenant) is brought
        forward, never back: the greater count of reads, the earlier first read and the
        later last read, and the file's end if the stored one has not ended (a secret ends
        once). Nothing else of a stored receipt changes."""


def same_secret(stored: SealedSecret, incoming: SealedSecret) -> bool:
    """The same record, whatever reads and wrong passphrases it has had since: sealed alike
    for the same readers, with the same receipt and label and passphrase marker, same
    expiry, and a read limit on both or on neither."""
    return (
        (stored.tenant, stored.owner, stored.readers)
        == (incoming.tenant, incoming.owner, incoming.readers)
        and (stored.receipt_id, stored.label) == (incoming.receipt_id, incoming.label)
        and stored.kdf == incoming.kdf
        and stored.key_id == incoming.key_id
        and stored.nonce == incoming.nonce
        and stored.ciphertext == incoming.ciphertext
        and same_lifecycle(stored, incoming)
    )


def same_lifecycle(stored: SealedSecret, incoming: SealedSecret) -> bool:
    """The same expiry, and a read limit on both or on neither."""
    return stored.expires_at == incoming.expires_at and (stored.reads_left is None) == (
        incoming.reads_left is None
    )


def lookup_keys(secret_id: str) -> tuple[str, str]:
    """The keys a secret id's record may be stored under, the preferred one first: its
    record key (the digest), then the id itself (a legacy record, until ``rewrap``
    converts it). A store may look the id up; it never writes it."""
    return record_key(secret_id), secret_id.lower()


def import_keys(incoming: SealedSecret) -> tuple[str, ...]:
    """Where a store may hold an imported record's secret, the preferred key first: its own
    key, and before it, for a legacy record (keyed by its id), the digest it converts to."""
    if keyed_by_id(incoming.record_key):
        return lookup_keys(incoming.record_key)
    return (incoming.record_key,)


def stored_for(
    incoming: SealedSecret, stored: Mapping[str, SealedSecret | None]
) -> tuple[str, SealedSecret | None] | None:
    """Where the store holds ``incoming``'s secret among the records ``stored`` (by record
    key), as (key, record) - the record None when it is malformed - or None when nowhere.
    A legacy record's secret counts as held under its digest too (converted since)."""
    for key in import_keys(incoming):
        if key in stored:
            return key, stored[key]
    return None


def import_outcome(stored: SealedSecret | None, incoming: SealedSecret) -> Imported:
    """What importing ``incoming`` does where the store holds ``stored`` for its secret: a
    record under the same key, or the converted form of a legacy ``incoming`` (sealed
    anew under its digest, so only its lifecycle can be compared)."""
    if stored is None:
        return Imported.NEW
    converted = stored.record_key != incoming.record_key
    if not (same_lifecycle if converted else same_secret)(stored, incoming):
        return Imported.CONFLICT
    if (
        incoming.reads_left is not None
        and stored.reads_left is not None
        and incoming.reads_left < stored.reads_left
    ):
        return Imported.FEWER_READS  # taken since: a read is never given back
    if incoming.passphrase_failures > stored.passphrase_failures:
        return Imported.MORE_FAILURES  # tried since: nor is a wrong passphrase
    return Imported.PRESENT


def brought_forward(stored: SealedSecret, incoming: SealedSecret) -> SealedSecret:
    """``stored`` as an import of ``incoming`` (the same record, ``import_outcome``
    FEWER_READS or MORE_FAILURES) leaves it: the fewer reads left and the more wrong
    passphrase tries of the two, so neither a read nor a guess is ever given back."""
    reads_left = stored.reads_left
    if reads_left is not None and incoming.reads_left is not None:
        reads_left = min(reads_left, incoming.reads_left)
    return replace(
        stored,
        reads_left=reads_left,
        passphrase_failures=max(stored.passphrase_failures, incoming.passphrase_failures),
    )


def derived_record_id(document: Mapping[str, Any]) -> str:
    """A stable ``record_id`` for an audit record stored before records carried one: the
    first 24 hex digits of a SHA-256 of its fields, so every export names it alike."""
    # The fields records had then, so the id does not change as fields are added.
    fields = {
        name: str(document.get(name)) for name in AUDIT_FIELDS[: AUDIT_FIELDS.index("record_id")]
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:24]


async def run_off_loop(
    func: Callable[..., T],
    *args: object,
    threads: StoreThreads,
    timeout: float,
    operation: str,
    system: str,
) -> T:
    """Run blocking store I/O in one of the store's threads, giving up after ``timeout``
    seconds.

    The caller is answered in bounded time even when the database hangs: a call still queued
    is never started, one already running is abandoned (its driver's own timeouts end it), and
    the request gets StoreUnavailable.
    """
    started = time.perf_counter()
    try:
        with store_span(operation, system=system):
            # The thread runs in a copy of this context, so driver spans nest under ours.
            call = functools.partial(contextvars.copy_context().run, func, *args)
            async with asyncio.timeout(timeout):
                return await threads.submit(call)
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


def judge_each(
    items: Sequence[FetchItem],
    records: Sequence[SealedSecret | Exception | None],
    now: dt.datetime,
) -> tuple[list[Fetched | Exception], list[AuditRecord | None]]:
    """The verdict on each fetch's record (``records``, in the same order): one result per
    item (the verdict, or the exception that item alone failed with: a corrupt record's, or
    one no key opens), and beside it its audit record stamped for that answer (None when it
    has none, or failed: a failure is audited by the audit layer, as the 500 it becomes)."""
    results: list[Fetched | Exception] = []
    audits: list[AuditRecord | None] = []
    for item, record in zip(items, records, strict=True):
        if isinstance(record, Exception):
            results.append(record)
            audits.append(None)
            continue
        try:
            fetched = judge_fetch(record, now, item.opener, item.caller, item.passphrase)
        except Exception as exc:  # this request's own failure (a record no key opens)
            results.append(exc)
            audits.append(None)
            continue
        results.append(fetched)
        found = fetched.found
        if item.audit is None or found is Found.UNLOCK:  # no answer yet: nothing to audit
            audits.append(None)
        else:
            audits.append(item.audit.answered(found.status, found.outcome))
    return results, audits


def wrong_passphrases(results: Sequence[Fetched | Exception]) -> list[int]:
    """The indexes of the verdicts that are a wrong passphrase: each a try to count."""
    return [
        k
        for k, result in enumerate(results)
        if isinstance(result, Fetched) and result.found is Found.PASSPHRASE and result.wrong
    ]


def count_wrong_passphrases(
    items: Sequence[FetchItem],
    results: list[Fetched | Exception],
    audits: list[AuditRecord | None],
    count: Callable[[SealedSecret, int], int | None],
) -> None:
    """Count each wrong passphrase of a batch's verdicts with ``count`` (the store's atomic
    increment of the record's wrong tries, below ``limit``, which deletes the record at
    the limit: the tries after it, or None when the record was gone or at the limit
    already), and set the verdict and its audit record as that count decides: the tries
    left, or a secret gone (404)."""
    for k in wrong_passphrases(results):
        result, passphrase = results[k], items[k].passphrase
        if not isinstance(result, Fetched) or result.record is None or passphrase is None:
            continue
        failures = count(result.record, passphrase.max_attempts)
        if failures is None:
            results[k] = Fetched(Found.MISSING)
            audit = items[k].audit
            audits[k] = None if audit is None else audit.answered(*Found.MISSING.value)
        else:
            results[k] = replace(result, tries_left=max(passphrase.max_attempts - failures, 0))


def fetch_results(
    results: Sequence[Fetched | Exception],
    audits: Sequence[AuditRecord | None],
    errors: Mapping[int, Exception | None],
) -> list[FetchResult | Exception]:
    """Each fetch's answer from its store call: the verdict and its audit record's write
    (``errors``, by the item's index, for the audit records written), or its exception."""
    answers: list[FetchResult | Exception] = []
    for k, (result, audit) in enumerate(zip(results, audits, strict=True)):
        if isinstance(result, Exception):
            answers.append(result)
        else:
            write = None if audit is None else AuditWrite(audit, errors.get(k))
            answers.append((result, write))
    return answers


def stamped_audits(
    items: Sequence[tuple[object, AuditRecord | None]], results: Sequence[Exception | None]
) -> dict[int, AuditRecord]:
    """The audit records of a create batch's items whose own record was stored (result
    None), by the item's index, stamped now: the answer (200) is decided."""
    return {
        k: audit.answered(200)
        for k, ((_, audit), error) in enumerate(zip(items, results, strict=True))
        if audit is not None and error is None
    }


def insert_results(
    results: Sequence[Exception | None],
    audits: Mapping[int, AuditRecord],
    errors: Mapping[int, Exception | None],
) -> list[AuditWrite | Exception | None]:
    """Each create's answer from its batch: its record's own error, or the write of its
    audit record (None when it had none)."""
    answers: list[AuditWrite | Exception | None] = []
    for k, error in enumerate(results):
        if error is not None:
            answers.append(error)
        else:
            audit = audits.get(k)
            answers.append(None if audit is None else AuditWrite(audit, errors.get(k)))
    return answers


def unavailable(exc: Exception) -> StoreUnavailable:
    """A whole batch call's failure as StoreUnavailable, so that each waiter can tell it
    from a refusal of its own record (any other exception)."""
    if isinstance(exc, StoreUnavailable):
        return exc
    return StoreUnavailable(type(exc).__name__)
