"""Key rotation: re-encrypt under the active key every record that another key sealed,
and convert every record still stored under its secret id to its record key.

A pass pages through those records in record key order, opens each with the keyring and
swaps in a fresh sealing under the active key, with a compare-and-swap on the record's key
id and nonce. Every swap is atomic, so a pass may stop anywhere (Ctrl-C, a crash,
``--max-batches``) and the next one simply continues: rewrapped records no longer match. A
record that changed meanwhile is skipped, never overwritten. Replicas serving traffic read
either the old record or the new one, and both open while the old key is still configured
as a previous key.

A record an earlier version stored under its secret id (a legacy record, its id in its
associated data) is converted, whatever key sealed it: re-sealed under the active key and
bound to its record key (the digest of the id, ``vault.records.record_key``), and moved
there (``SecretStore.convert_sealed``: one transaction on SQLite; on MongoDB an insert,
then the delete of the old document, finished by the next pass if cut short). Replicas
find it under either key meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from vault.crypto import Keyring
from vault.errors import DecryptionFailed, StoreUnavailable, UnknownKey
from vault.records import SealedSecret, keyed_by_id, record_key
from vault.stores.base import Remaining, SecretStore

DEFAULT_BATCH_SIZE = 500
# Swaps in flight at once: each one waits for a durable write, so they overlap well.
CONCURRENCY = 8
# Past this many, records left untouched are only counted, not listed one by one.
MAX_PROBLEM_LINES = 100

EXIT_REMAINING = 1
EXIT_INTERRUPTED = 130


@dataclass
class Counts:
    """What happened to the records of one batch, or of a whole pass."""

    examined: int = 0
    rewrapped: int = 0
    converted: int = 0  # moved from their id to their record key (and re-sealed)
    changed: int = 0
    unknown_key: int = 0
    failed_authentication: int = 0

    def add(self, other: Counts) -> None:
        for item in dataclasses.fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


@dataclass
class RewrapReport:
    """The outcome of a pass; ``ok`` means no record needs any key but the active one, and
    none is stored under its id."""

    dry_run: bool = False
    totals: Counts = field(default_factory=Counts)
    batches: int = 0
    finished: bool = False  # reached the last record (not stopped by max_batches)
    remaining: Remaining | None = None  # what is left to do, counted after the pass

    @property
    def ok(self) -> bool:
        return self.remaining is not None and self.remaining.records == 0

    def summary(self) -> list[str]:
        """The final table, one ``label  number`` per line."""
        t = self.totals
        rows = [
            ("examined", t.examined),
            ("would rewrap" if self.dry_run else "rewrapped", t.rewrapped),
            ("would convert" if self.dry_run else "converted", t.converted),
            ("changed concurrently", t.changed),
            ("unknown key", t.unknown_key),
            ("failed authentication", t.failed_authentication),
        ]
        if self.remaining is not None:
            rows.append(("remaining under other keys", self.remaining.other_keys))
            rows.append(("remaining keyed by id", self.remaining.keyed_by_id))
        state = "finished" if self.finished else "stopped"
        plural = "" if self.batches == 1 else "es"
        head = f"rewrap {state} after {self.batches} batch{plural}"
        return [f"{head}{' (dry run: nothing written)' if self.dry_run else ''}:"] + [
            f"  {label:<28}{number:>10}" for label, number in rows
        ]


def _quiet(line: str) -> None:
    """Print nothing (the default ``echo``)."""


class _Pass:
    """One pass's state: the records it left untouched so far, and how each is told."""

    def __init__(
        self,
        store: SecretStore,
        keyring: Keyring,
        report: RewrapReport,
        *,
        hash_secret_id: Callable[[str], str],
        echo: Callable[[str], None],
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.report = report
        self.hash_secret_id = hash_secret_id
        self.echo = echo
        self.listed = 0

    def named(self, record: SealedSecret) -> str:
        """How a record is named in the output, never by its id: a legacy record (keyed by
        its id) by the audit log's HMAC of it, any other by its record key, which fetches
        nothing."""
        key = record.record_key
        if keyed_by_id(key):
            return f"secret_id_hmac {self.hash_secret_id(key)}"
        return f"record_key {key}"

    def untouched(self, position: int, record: SealedSecret, why: str) -> None:
        self.listed += 1
        if self.listed <= MAX_PROBLEM_LINES:
            self.echo(f"record {position}: {why}; left untouched ({self.named(record)})")
        elif self.listed == MAX_PROBLEM_LINES + 1:
            self.echo(f"more than {MAX_PROBLEM_LINES} records left untouched: only counting now")

    async def one(self, position: int, record: SealedSecret, counts: Counts) -> None:
        try:
            plaintext = self.keyring.open(record)
        except UnknownKey:
            counts.unknown_key += 1
            self.untouched(position, record, f"sealed by key {record.key_id}, not configured")
            return
        except DecryptionFailed:
            counts.failed_authentication += 1
            self.untouched(position, record, f"fails authentication under key {record.key_id}")
            return
        legacy = keyed_by_id(record.record_key)
        if self.report.dry_run:
            if legacy:
                counts.converted += 1
            else:
                counts.rewrapped += 1
            return
        if legacy:  # bound to its id so far: sealed anew for its record key, and moved there
            fresh = self.keyring.reseal(record, plaintext, record_key(record.record_key))
            del plaintext
            if await self.store.convert_sealed(record, fresh):
                counts.converted += 1
            else:
                counts.changed += 1  # picked up by the next pass if still under its id
            return
        fresh = self.keyring.reseal(record, plaintext, record.record_key)
        del plaintext
        if await self.store.replace_sealed(record, fresh):
            counts.rewrapped += 1
        else:
            counts.changed += 1  # picked up by the next pass if still under an old key

    async def batch(self, records: list[SealedSecret], first_position: int) -> Counts:
        counts = Counts(examined=len(records))
        gate = asyncio.Semaphore(CONCURRENCY)

        async def gated(position: int, record: SealedSecret) -> None:
            async with gate:  # also bounds how many plaintexts are in memory at once
                await self.one(position, record, counts)

        try:
            outcomes = await asyncio.gather(
                *(gated(first_position + i, r) for i, r in enumerate(records)),
                return_exceptions=True,
            )
        except BaseException:  # Ctrl-C cancels the batch: count the records already done
            self.report.totals.add(counts)
            raise
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            self.report.totals.add(counts)
            raise failures[0]
        return counts

    def told(self, counts: Counts) -> None:
        report = self.report
        self.echo(
            f"batch {report.batches}: examined {counts.examined}, "
            f"{'would rewrap' if report.dry_run else 'rewrapped'} {counts.rewrapped}, "
            f"{'would convert' if report.dry_run else 'converted'} {counts.converted}, "
            f"changed concurrently {counts.changed}, unknown key {counts.unknown_key}, "
            f"failed authentication {counts.failed_authentication} "
            f"({report.totals.examined} examined in all)"
        )


async def rewrap(
    store: SecretStore,
    keyring: Keyring,
    *,
    hash_secret_id: Callable[[str], str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    max_batches: int | None = None,
    echo: Callable[[str], None] = _quiet,
    report: RewrapReport | None = None,
) -> RewrapReport:
    """One pass over an opened store; ``echo`` gets a progress line per batch and a line per
    record left untouched. ``report`` (if given) is filled in as the pass goes, so a caller
    that is interrupted still knows what was done. Raises StoreUnavailable if the store goes.

    Records left untouched are named by their position in this pass and by their record key
    (or for a legacy record by ``hash_secret_id``, the audit log's HMAC), never by an id.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    report = RewrapReport(dry_run=dry_run) if report is None else report
    one_pass = _Pass(store, keyring, report, hash_secret_id=hash_secret_id, echo=echo)
    active = keyring.active_key_id
    if not dry_run:
        await store.prepare_rewrap()
    after = ""
    while max_batches is None or report.batches < max_batches:
        records = await store.records_to_rewrap(active, after, batch_size)
        if not records:
            report.finished = True
            break
        counts = await one_pass.batch(records, report.totals.examined + 1)
        report.batches += 1
        report.totals.add(counts)
        after = records[-1].record_key
        one_pass.told(counts)
        if len(records) < batch_size:
            report.finished = True
            break
    if not dry_run:
        await store.finish_rewrap()
    report.remaining = await store.count_to_rewrap(active)
    return report


def _left(remaining: Remaining, *, dry_run: bool) -> str:
    """``5 records are still sealed by other keys and 2 are still keyed by their id``."""
    are = "are" if dry_run else "are still"
    parts = []
    if remaining.other_keys or not remaining.keyed_by_id:
        parts.append(f"{remaining.other_keys} records {are} sealed by other keys")
    if remaining.keyed_by_id:
        noun = "" if parts else " records"
        parts.append(f"{remaining.keyed_by_id}{noun} {are} keyed by their secret id")
    return " and ".join(parts)


def _verdict(report: RewrapReport, active: str) -> tuple[int, str]:
    """The exit status and the last line: what the operator should do next."""
    remaining = report.remaining or Remaining(0, 0, 0)
    if report.ok:
        if report.dry_run:
            return 0, (
                f"every record is already sealed by the active key {active} and stored "
                "under its record key"
            )
        return 0, (
            f"every record is now sealed by the active key {active} and stored under its "
            "record key: the previous keys are no longer needed by any record; remove them "
            "from MASTER_KEY_PREVIOUS"
        )
    t = report.totals
    unreadable = t.unknown_key + t.failed_authentication
    left = _left(remaining, dry_run=report.dry_run)
    if not report.finished:
        return EXIT_REMAINING, (
            f"secret-manager: {'dry run ' if report.dry_run else ''}stopped after "
            f"{report.batches} batch{'' if report.batches == 1 else 'es'} (--max-batches); "
            f"{left}: run rewrap again to continue"
        )
    message = f"secret-manager: {'dry run: ' if report.dry_run else ''}{left}"
    if unreadable:
        message += (
            f"; {unreadable} cannot be opened with the configured keys (listed above): "
            "rewrap cannot re-encrypt them; keep every key that may have sealed them in "
            "MASTER_KEY_PREVIOUS and run rewrap again"
        )
    if report.dry_run:
        if remaining.records > unreadable:
            message += "; run rewrap without --dry-run to re-encrypt and convert the others"
        return EXIT_REMAINING, message
    if remaining.records > unreadable:
        message += (
            "; others were written or changed during this pass (is a replica still sealing "
            "with an old MASTER_KEY, or still running an earlier version?): run rewrap again"
        )
    return EXIT_REMAINING, message


def _interruptible(
    run: Callable[[], Coroutine[Any, Any, None]], report: RewrapReport, active: str
) -> tuple[int, str]:
    """Run the pass, Ctrl-C stopping it between swaps; the exit status and the last line."""
    untouched = "every record is either rewrapped, converted or untouched"
    # A shell starts a background job (`rewrap &` in a script) with SIGINT ignored, and the
    # process keeps that: Ctrl-C or `kill -INT` would then do nothing. Stopping between two
    # swaps is always safe, so take SIGINT back whatever this process was started with.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED, (
            f"secret-manager: interrupted; {untouched}: run rewrap again to continue"
        )
    except StoreUnavailable as exc:
        return EXIT_REMAINING, (
            f"secret-manager: the store stopped answering ({exc}); {untouched}: "
            "run rewrap again once it is back"
        )
    except Exception as exc:
        # Driver errors can quote documents: name the error by its type and place only.
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return EXIT_REMAINING, (
            f"secret-manager: rewrap stopped by {type(exc).__name__} at "
            f"{frame.filename}:{frame.lineno}; {untouched}: run rewrap again once it is fixed"
        )
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    return _verdict(report, active)


def command(
    store: SecretStore,
    keyring: Keyring,
    *,
    store_label: str,
    hash_secret_id: Callable[[str], str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    max_batches: int | None = None,
) -> int:
    """``secret-manager rewrap``: one pass, printed as it goes; the exit status says whether
    any record still needs a previous key (0: none does)."""

    def echo(line: str) -> None:
        print(line, flush=True)

    previous = [kid for kid in keyring.key_ids if kid != keyring.active_key_id]
    echo(
        f"rewrap: {store_label}; active key {keyring.active_key_id}; previous keys "
        f"{', '.join(previous) or 'none'}; batches of {batch_size}"
        + ("; dry run: nothing is written" if dry_run else "")
    )
    report = RewrapReport(dry_run=dry_run)

    async def run() -> None:
        await store.open()
        try:
            await rewrap(
                store,
                keyring,
                hash_secret_id=hash_secret_id,
                batch_size=batch_size,
                dry_run=dry_run,
                max_batches=max_batches,
                echo=echo,
                report=report,
            )
        finally:
            await store.close()

    status, message = _interruptible(run, report, keyring.active_key_id)
    for line in report.summary():
        echo(line)
    print(message, file=sys.stderr if status else sys.stdout, flush=True)
    return status
