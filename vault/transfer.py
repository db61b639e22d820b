"""``secret-manager export`` and ``import``: a store's records in a file, sealed as stored.

The file is JSON Lines (docs/operations.md#export-file-format): a header naming the format
and its version, one line per secret record, then per receipt, then per audit record, and
an end line with the counts and a SHA-256 of every byte before it, so that a truncated or
altered file is refused. Records stay sealed (nonce, ciphertext, key id): neither command
needs a master key, and nothing in the file is plaintext. Records are named by their record
key (the digest of the secret id), never by an id: an export of a store that still holds
records keyed by their id is refused until ``rewrap`` converts them. Files of format 1,
whose records carry their id, are still imported, as such legacy records.

Who may see a secret (its tenant, owner and readers, bound into its ciphertext) travels
with it, written only where it differs from a plain secret's (the default tenant, no named
readers): a file of plain secrets is byte for byte what earlier releases wrote, and an
earlier release refuses, naming the line, a file holding a record it could not store whole.
A secret's receipt id and label travel the same way, on its line when set, and receipts as
lines of their own, every one stored (its secret live or ended), counted in the end line
only when there are some. A secret under a passphrase carries its key derivation's marker
(bound into its ciphertext) and its wrong tries so far, and its receipt those tries: only
for such a secret, so every other line is written as before.

The webhook outbox does not travel: its events report changes made on the exporting
deployment, which delivers them; an import changes no secret's life, and the importing
side sending them again would deliver each a second time, from another deliverer.

Both stream. An import checks the whole file, copying it to an unnamed temporary file as it
goes, before it writes anything; only a file that passes is then read back into the store.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import sqlite3
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import IO, Any

from vault.apikeys import KEY_NAME
from vault.crypto import known_kdf
from vault.errors import InvalidValue, TransferRefused
from vault.records import (
    DEFAULT_TENANT,
    Receipt,
    ReceiptState,
    SealedSecret,
    StoredSecret,
    access_fields,
    keyed_by_id,
    passphrase_fields,
    receipt_fields,
)
from vault.stores.base import AUDIT_FIELDS, BulkStore, Imported, utc_now
from vault.validation import MAX_LABEL, MAX_READERS, label_text, normalize_secret_id

FORMAT = "secret-manager-export"
# 2: records named by record key; 1: by secret id (still imported). Who may see a secret
# (tenant, owner, readers), its receipt id and label, receipt lines, and a passphrase's
# marker and wrong tries joined version 2 as optional: see the module's docstring.
VERSION = 2
BATCH = 1000  # records per store call
# No record comes near this (a secret is at most MAX_SECRET_BYTES): a longer line is damage,
# and reading it whole would let a broken file take any amount of memory.
MAX_LINE_BYTES = 1 << 20
NONCE_BYTES = 12
TAG_BYTES = 16
_HEX = frozenset("0123456789abcdef")
RECORD_KEY_DIGITS = 64
# Who may see a secret, as a line holds it when not a plain secret's; an audit line's tenant
# is written when the record has one (API keys on).
ACCESS_FIELDS = ("tenant", "owner", "readers")
NAME_RULE = "1-64 characters of A-Z a-z 0-9 . _ -"
# A secret made with a receipt: its receipt id and label, on its line when set.
RECEIPT_ID_FIELDS = ("receipt_id", "label")
LABEL_RULE = f"1-{MAX_LABEL} printable characters (no control characters or line breaks)"
# A secret under a passphrase: its key derivation's marker and its wrong tries, both on its
# line or neither; its receipt's line has the tries (left out for a secret without one).
PASSPHRASE_FIELDS = ("kdf", "passphrase_failures")
KDF_RULE = "a passphrase key derivation this release knows (scrypt:N:r:p)"
# A receipt line's fields, every one always written (null where it does not apply).
RECEIPT_FIELDS = (
    "receipt_key",
    "tenant",
    "label",
    "created_at",
    "expires_at",
    "max_reads",
    "reads",
    "first_read_at",
    "last_read_at",
    "ended_at",
    "state",
)
STATES = (ReceiptState.ACTIVE, ReceiptState.USED_UP, ReceiptState.EXPIRED, ReceiptState.DELETED)
# Tenant -> the names of the API keys of that tenant, as the importing server knows them.
KnownReaders = Callable[[str], Collection[str]]


@dataclasses.dataclass
class Counts:
    """What a command did, for its summary line."""

    secrets: int = 0
    audit: int = 0
    receipts: int = 0
    left_out: int = 0  # export: expired, used up or malformed; import: expired since export
    receipts_left_out: int = 0  # export: receipts that are not whole (a database edit)
    receipts_new: int = 0  # import: receipts the store did not hold
    new: int = 0
    keyed_by_id: int = 0  # import: of the new, those of a format 1 file, stored under their id
    present: int = 0
    fewer_reads: int = 0
    more_failures: int = 0  # import: held already, with fewer wrong passphrase tries
    conflicts: int = 0
    audit_new: int = 0
    # import: of the secrets the store now holds as the file has them, those naming a reader
    # that is no API key of their tenant on the importing server (stored all the same)
    unknown_readers: int = 0
    sha256: str = ""
    store: str = ""  # the store's label, for the summary


Progress = Callable[[int], None]
# A progress display for one pass: ``bar(description, total or None)`` as a context manager
# whose value is called with each number of records done.
Bar = Callable[[str, "int | None"], AbstractContextManager[Progress]]


@contextmanager
def no_bar(description: str, total: int | None) -> Iterator[Progress]:
    """No progress display (not a terminal)."""
    yield lambda done: None


def _timestamp(moment: dt.datetime) -> str:
    """RFC 3339, UTC, microseconds: every audit record's time, exactly."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _seconds(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def secret_line(record: StoredSecret) -> dict[str, Any]:
    """A secret record as the file holds it: who may see it only where that is not a plain
    secret's (the default tenant, no owner, no named readers)."""
    sealed = record.sealed
    line: dict[str, Any] = {
        "type": "secret",
        "record_key": sealed.record_key,
        "key_id": sealed.key_id,
        "nonce": _b64(sealed.nonce),
        "ciphertext": _b64(sealed.ciphertext),
        "created_at": None if record.created_at is None else _timestamp(record.created_at),
        "expires_at": None if sealed.expires_at is None else _seconds(sealed.expires_at),
        "reads_left": sealed.reads_left,
        **access_fields(sealed),
        **receipt_fields(sealed),
        **passphrase_fields(sealed),
    }
    return line


def _optional(moment: dt.datetime | None, form: Callable[[dt.datetime], str]) -> str | None:
    return None if moment is None else form(moment)


def receipt_line(receipt: Receipt) -> dict[str, Any]:
    """A receipt as the file holds it: every field, null where it does not apply, and the
    wrong passphrase tries only for a secret under a passphrase (a receipt of any other is
    written as before)."""
    line: dict[str, Any] = {
        "type": "receipt",
        "receipt_key": receipt.receipt_key,
        "tenant": receipt.tenant,
        "label": receipt.label,
        "created_at": _timestamp(receipt.created_at),
        "expires_at": _optional(receipt.expires_at, _seconds),
        "max_reads": receipt.max_reads,
        "reads": receipt.reads,
        "first_read_at": _optional(receipt.first_read_at, _timestamp),
        "last_read_at": _optional(receipt.last_read_at, _timestamp),
        "ended_at": _optional(receipt.ended_at, _timestamp),
        "state": receipt.state,
    }
    if receipt.passphrase_failures is not None:
        line["passphrase_failures"] = receipt.passphrase_failures
    return line


def audit_line(document: dict[str, Any]) -> dict[str, Any]:
    """An audit record as the file holds it; ``tenant`` only when it has one (a record of a
    server without API keys is written as before tenants existed)."""
    line: dict[str, Any] = {"type": "audit"}
    for name in AUDIT_FIELDS:
        if name == "tenant" and document[name] is None:
            continue
        line[name] = _timestamp(document[name]) if name == "ts" else document[name]
    return line


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and KEY_NAME.fullmatch(value) is not None


def access_problem(tenant: Any, owner: Any, readers: Any) -> str | None:
    """What makes who may see a record unfit for the file (naming the field, never a
    value), or None. Names are key names: the associated data that binds them to the
    ciphertext relies on their having no separator in them."""
    if not _is_name(tenant):
        return f"tenant is not a tenant name ({NAME_RULE})"
    if owner is not None and not _is_name(owner):
        return f"owner is not a key name ({NAME_RULE}) or null"
    if readers is None:
        return None
    if not isinstance(readers, list | tuple) or not 1 <= len(readers) <= MAX_READERS:
        return f"readers is not a JSON array of 1 to {MAX_READERS} key names, or null"
    if not all(_is_name(reader) for reader in readers):
        return f"readers holds something that is not a key name ({NAME_RULE})"
    if len(set(readers)) != len(readers):
        return "readers names a key more than once"
    return None


def passphrase_fit(sealed: SealedSecret) -> bool:
    """Whether a secret's passphrase fields are fit for the file: none, or a marker this
    release derives with and a whole number of wrong tries (an edited marker no longer
    opens the record, and written out would make the whole file refused by import)."""
    if sealed.kdf is None:
        return True
    return known_kdf(sealed.kdf) and _is_count(sealed.passphrase_failures, 0)


def _is_label(value: Any) -> bool:
    try:
        label_text(value)
    except InvalidValue:
        return False
    return True


def _is_count(value: Any, least: int) -> bool:
    return type(value) is int and value >= least  # bool is no count


def receipt_problem(receipt: Receipt) -> str | None:
    """What makes a receipt unfit for the file (naming the field, never a value), or None:
    the rules every receipt a store writes keeps, so that one edited in the database is
    left out of an export rather than making the whole file refused."""
    key = receipt.receipt_key
    if not isinstance(key, str) or len(key) != RECORD_KEY_DIGITS or not set(key) <= _HEX:
        return f"receipt_key is not {RECORD_KEY_DIGITS} hex digits"
    if not _is_name(receipt.tenant):
        return f"tenant is not a tenant name ({NAME_RULE})"
    if receipt.label is not None and not _is_label(receipt.label):
        return f"label is not {LABEL_RULE}, or null"
    max_reads = receipt.max_reads
    if max_reads is not None and not _is_count(max_reads, 1):
        return "max_reads is not a whole number of reads, at least 1, or null"
    reads = receipt.reads
    if not _is_count(reads, 0) or (max_reads is not None and reads > max_reads):
        return "reads is not a whole number of reads, from 0 to max_reads"
    first, last = receipt.first_read_at, receipt.last_read_at
    if (first is None, last is None) != (reads == 0, reads == 0) or (
        first is not None and last is not None and first > last
    ):
        return "first_read_at and last_read_at are not the times of its first and last read"
    wrong = receipt.passphrase_failures
    if wrong is not None and not _is_count(wrong, 0):
        return "passphrase_failures is not a whole number of wrong tries, at least 0, or null"
    if receipt.state not in STATES:
        return f"state is not one of {', '.join(STATES)}"
    if (receipt.state == ReceiptState.ACTIVE) != (receipt.ended_at is None):
        return "ended_at is not null exactly while state is active"
    return None


class Writer:
    """Writes the file: header, records, and the end line with counts and SHA-256."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.secrets = 0
        self.audit = 0
        self.receipts = 0

    def _line(self, value: dict[str, Any]) -> None:
        data = json.dumps(value, separators=(",", ":")).encode("utf-8") + b"\n"
        self._hash.update(data)
        self._out.write(data)

    def header(self, *, store: str, audit: bool) -> None:
        self._line(
            {
                "format": FORMAT,
                "version": VERSION,
                "exported_at": _timestamp(utc_now()),
                "store": store,
                "audit": audit,
            }
        )

    def secret(self, record: StoredSecret) -> None:
        self._line(secret_line(record))
        self.secrets += 1

    def receipt(self, receipt: Receipt) -> None:
        self._line(receipt_line(receipt))
        self.receipts += 1

    def audit_record(self, document: dict[str, Any]) -> None:
        self._line(audit_line(document))
        self.audit += 1

    def end(self) -> str:
        """Write the end line (not itself hashed); the SHA-256 it carries. It counts the
        receipts only when there are some: a file without them ends as before they
        existed."""
        digest = self._hash.hexdigest()
        end: dict[str, Any] = {"type": "end", "secrets": self.secrets}
        if self.receipts:
            end["receipts"] = self.receipts
        end.update(audit=self.audit, sha256=digest)
        self._out.write(json.dumps(end, separators=(",", ":")).encode("utf-8") + b"\n")
        self._out.flush()
        return digest


def keyed_by_id_refusal(count: int) -> TransferRefused:
    """Why an export stops at records still keyed by their id, and what to do."""
    records = (
        "1 record stored under its secret id"
        if count == 1
        else (f"{count} records stored under their secret ids")
    )
    return TransferRefused(
        f"the store still holds {records}, which an export would write in clear: run "
        "secret-manager rewrap first (it converts them), then export again"
    )


def export(store: BulkStore, out: IO[bytes], *, audit: bool, store_kind: str, bar: Bar) -> Counts:
    """Write every live record (and with ``audit`` the audit log) of ``store`` to ``out``;
    TransferRefused, before anything is written, while the store holds records keyed by
    their id (or at the first one met, if one is imported meanwhile into a store without
    snapshots)."""
    writer = Writer(out)
    counts = Counts()
    now = utc_now()
    with store.snapshot():
        legacy = store.count_keyed_by_id()
        if legacy:
            raise keyed_by_id_refusal(legacy)
        stored = store.count_secrets()
        receipts = store.count_receipts()
        total = stored + receipts + (store.count_audit() if audit else 0)
        writer.header(store=store_kind, audit=audit)
        with bar("exporting", total) as advance:
            for record in store.secrets(now):
                sealed = record.sealed
                if keyed_by_id(sealed.record_key):
                    raise keyed_by_id_refusal(1)
                if access_problem(
                    sealed.tenant, sealed.owner, sealed.readers
                ) is not None or not passphrase_fit(sealed):
                    # Edited in the database: it no longer opens, and written out it would
                    # make the whole file refused by import. Left out, as malformed.
                    continue
                writer.secret(record)
                advance(1)
            advance(stored - writer.secrets)  # left out: expired, used up or malformed
            # Every receipt, its secret's end included: the importing server's purge applies
            # its own RECEIPT_RETENTION_SECONDS to them.
            for receipt in store.receipts():
                if receipt_problem(receipt) is None:  # else edited malformed: left out
                    writer.receipt(receipt)
            advance(receipts)
            if audit:
                for document in store.audit():
                    writer.audit_record(document)
                    advance(1)
    counts.sha256 = writer.end()
    counts.secrets, counts.audit, counts.receipts = writer.secrets, writer.audit, writer.receipts
    counts.left_out = max(stored - writer.secrets, 0)
    counts.receipts_left_out = max(receipts - writer.receipts, 0)
    return counts


# ---- reading ------------------------------------------------------------------------------


def _fields(
    value: Any, line: int, kind: str, names: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The fields of a record line: every one of ``names``, any of ``optional`` (fields a
    later release added, absent from files written before), nothing else."""
    if not isinstance(value, dict) or not (
        {"type", *names} <= set(value) <= {"type", *names, *optional}
    ):
        raise TransferRefused(
            f"line {line} is not a whole {kind} record (its fields are not the ones "
            "this format has)"
        )
    return value


def _bytes(value: Any, line: int, name: str) -> bytes:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            pass
    raise TransferRefused(f"line {line}: {name} is not base64")


def _time(value: Any, line: int, name: str) -> dt.datetime:
    if isinstance(value, str) and value.endswith("Z"):
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            pass
    raise TransferRefused(f"line {line}: {name} is not an RFC 3339 UTC time")


def _text(value: Any, line: int, name: str, *, optional: bool = False) -> Any:
    if isinstance(value, str) or (optional and value is None):
        return value
    raise TransferRefused(f"line {line}: {name} is not {'text or null' if optional else 'text'}")


def parse_secret(value: Any, line: int, version: int = VERSION) -> StoredSecret:
    """The record a secret line holds; TransferRefused naming the line (never a value) if
    malformed. A line of format 1 names its record by secret id: it is read as a legacy
    record, keyed by that id. Who may see it (``ACCESS_FIELDS``) and its receipt id and
    label (``RECEIPT_ID_FIELDS``) and its passphrase's (``PASSPHRASE_FIELDS``) are optional:
    a line without them is a plain secret's, as every line written before they existed."""
    name = "record_key" if version >= 2 else "secret_id"
    names = (name, "key_id", "nonce", "ciphertext", "created_at", "expires_at")
    optional = (*ACCESS_FIELDS, *RECEIPT_ID_FIELDS, *PASSPHRASE_FIELDS) if version >= 2 else ()
    fields = _fields(value, line, "secret", (*names, "reads_left"), optional)
    key = _text(fields[name], line, name)
    if version >= 2:
        if len(key) != RECORD_KEY_DIGITS or not set(key) <= _HEX:
            raise TransferRefused(f"line {line}: record_key is not {RECORD_KEY_DIGITS} hex digits")
    else:
        try:
            if normalize_secret_id(key) != key:
                raise InvalidValue(key)
        except InvalidValue:
            raise TransferRefused(f"line {line}: secret_id is not a lower-case UUID") from None
    key_id = _text(fields["key_id"], line, "key_id")
    if len(key_id) != 16 or not set(key_id) <= _HEX:
        raise TransferRefused(f"line {line}: key_id is not 16 hex digits")
    nonce = _bytes(fields["nonce"], line, "nonce")
    if len(nonce) != NONCE_BYTES:
        raise TransferRefused(f"line {line}: nonce is not {NONCE_BYTES} bytes")
    ciphertext = _bytes(fields["ciphertext"], line, "ciphertext")
    if len(ciphertext) < TAG_BYTES:
        raise TransferRefused(f"line {line}: ciphertext is shorter than its authentication tag")
    created = fields["created_at"]
    expires = fields["expires_at"]
    reads_left = fields["reads_left"]
    if reads_left is not None and (type(reads_left) is not int or reads_left < 1):
        raise TransferRefused(f"line {line}: reads_left is not a whole number of reads, at least 1")
    tenant = fields.get("tenant", DEFAULT_TENANT)
    owner = fields.get("owner")
    readers = fields.get("readers")
    problem = access_problem(tenant, owner, readers)
    if problem is not None:
        raise TransferRefused(f"line {line}: {problem}")
    receipt_id = fields.get("receipt_id")
    if receipt_id is not None and not _is_uuid(receipt_id):
        raise TransferRefused(f"line {line}: receipt_id is not a lower-case UUID, or null")
    label = fields.get("label")
    if label is not None and not _is_label(label):
        raise TransferRefused(f"line {line}: label is not {LABEL_RULE}, or null")
    kdf, failures = _passphrase(fields, line)
    sealed = SealedSecret(
        key,
        key_id,
        nonce,
        ciphertext,
        expires_at=None if expires is None else _time(expires, line, "expires_at"),
        reads_left=reads_left,
        tenant=tenant,
        owner=owner,
        readers=None if readers is None else tuple(readers),
        receipt_id=receipt_id,
        label=label,
        kdf=kdf,
        passphrase_failures=failures,
    )
    return StoredSecret(sealed, None if created is None else _time(created, line, "created_at"))


def _passphrase(fields: dict[str, Any], line: int) -> tuple[str | None, int]:
    """A secret line's passphrase marker and wrong tries: both there (a secret under a
    passphrase) or neither (None, 0). Without its marker such a secret would no longer open
    (the marker is bound into its ciphertext), and without its tries it would be given back
    the guesses already spent."""
    present = [name in fields for name in PASSPHRASE_FIELDS]
    if not any(present):
        return None, 0
    if not all(present):
        raise TransferRefused(
            f"line {line}: kdf and passphrase_failures are not both there (a secret under a "
            "passphrase has both, any other neither)"
        )
    kdf, failures = fields["kdf"], fields["passphrase_failures"]
    if not known_kdf(kdf):
        raise TransferRefused(f"line {line}: kdf is not {KDF_RULE}")
    if not _is_count(failures, 0):
        raise TransferRefused(
            f"line {line}: passphrase_failures is not a whole number of wrong tries, at least 0"
        )
    return kdf, failures


def _is_uuid(value: Any) -> bool:
    """A UUID in its canonical form, in lower case (as the service makes them)."""
    try:
        return isinstance(value, str) and normalize_secret_id(value) == value
    except InvalidValue:
        return False


def _optional_time(value: Any, line: int, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return _time(value, line, name)
    except TransferRefused:
        raise TransferRefused(f"line {line}: {name} is not an RFC 3339 UTC time or null") from None


def parse_receipt(value: Any, line: int) -> Receipt:
    """The receipt a receipt line holds; TransferRefused naming the line and the field
    (never a value) if malformed."""
    fields = _fields(value, line, "receipt", RECEIPT_FIELDS, ("passphrase_failures",))
    receipt = Receipt(
        receipt_key=fields["receipt_key"],
        tenant=fields["tenant"],
        label=fields["label"],
        created_at=_time(fields["created_at"], line, "created_at"),
        expires_at=_optional_time(fields["expires_at"], line, "expires_at"),
        max_reads=fields["max_reads"],
        reads=fields["reads"],
        first_read_at=_optional_time(fields["first_read_at"], line, "first_read_at"),
        last_read_at=_optional_time(fields["last_read_at"], line, "last_read_at"),
        ended_at=_optional_time(fields["ended_at"], line, "ended_at"),
        state=fields["state"],
        passphrase_failures=fields.get("passphrase_failures"),
    )
    problem = receipt_problem(receipt)
    if problem is not None:
        raise TransferRefused(f"line {line}: {problem}")
    return receipt


_AUDIT_REQUIRED = tuple(name for name in AUDIT_FIELDS if name != "tenant")


def parse_audit(value: Any, line: int) -> dict[str, Any]:
    """The document an audit line holds; TransferRefused naming the line if malformed.
    ``tenant`` is optional (null when absent): a record of a server without API keys has
    none, and no line written before tenants existed."""
    fields = _fields(value, line, "audit", _AUDIT_REQUIRED, ("tenant",))
    document = {name: fields.get(name) for name in AUDIT_FIELDS}
    record_id = _text(document["record_id"], line, "record_id")
    if len(record_id) != 24 or not set(record_id) <= _HEX:
        raise TransferRefused(f"line {line}: record_id is not 24 hex digits")
    document["ts"] = _time(document["ts"], line, "ts")
    for name in ("op", "outcome", "client_ip", "request_id"):
        _text(document[name], line, name)
    for name in ("secret_id_hmac", "user_agent", "api_key_name", "tenant"):
        _text(document[name], line, name, optional=True)
    if type(document["status"]) is not int:
        raise TransferRefused(f"line {line}: status is not a whole number")
    if type(document["latency_ms"]) not in (int, float):
        raise TransferRefused(f"line {line}: latency_ms is not a number")
    return document


def _json(data: bytes, line: int) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise TransferRefused(f"line {line} is not JSON") from None


def _lines(source: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Numbered lines, each with its newline; TransferRefused for an over-long one."""
    number = 0
    while data := source.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(data) > MAX_LINE_BYTES:
            raise TransferRefused(f"line {number} is longer than any record can be")
        yield number, data


def check_header(data: bytes) -> dict[str, Any]:
    """The header, or TransferRefused: a foreign file, or one from a newer secret-manager."""
    try:
        header = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TransferRefused(
            "it is not a secret-manager export (its first line is no export header)"
        )
    version = header.get("version")
    if type(version) is not int or version < 1:
        raise TransferRefused("its header is damaged (no valid format version)")
    if version > VERSION:
        raise TransferRefused(
            f"it was written by a newer secret-manager (export format version {version}; this "
            f"one reads version {VERSION}): import it with that release or a later one"
        )
    return header


@dataclasses.dataclass(frozen=True)
class Checked:
    """A file that passed every check: its counts and SHA-256, and its format version."""

    secrets: int
    audit: int
    sha256: str
    version: int = VERSION
    receipts: int = 0


def check_and_copy(source: IO[bytes], copy: IO[bytes], progress: Progress) -> Checked:
    """Read the whole file, checking every line, the counts and the SHA-256, and copy its
    record lines to ``copy``; TransferRefused, naming what is wrong, at the first problem."""
    lines = _lines(source)
    first = next(lines, None)
    if first is None:
        raise TransferRefused("it is empty: not a secret-manager export")
    version: int = check_header(first[1])["version"]
    digest = hashlib.sha256(first[1])
    secrets = audit = receipts = 0
    number = 1
    for number, data in lines:
        if not data.endswith(b"\n"):
            raise TransferRefused(
                f"it is truncated: line {number} is cut off, and no end line follows"
            )
        value = _json(data, number)
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "secret":
            parse_secret(value, number, version)
            secrets += 1
        elif kind == "receipt":
            parse_receipt(value, number)
            receipts += 1
        elif kind == "audit":
            parse_audit(value, number)
            audit += 1
        elif kind == "end":
            checked = Checked(secrets, audit, digest.hexdigest(), version, receipts)
            _check_end(value, checked)
            if next(lines, None) is not None:
                raise TransferRefused(f"it is damaged: more follows its end line (line {number})")
            return checked
        else:
            raise TransferRefused(f"line {number} is not a record of this format")
        digest.update(data)
        copy.write(data)
        progress(1)
    raise TransferRefused(
        f"it is truncated: it ends after line {number} without the end line that closes "
        "every export"
    )


# The end line's fields; "receipts" only in a file that holds receipt lines.
END_FIELDS = frozenset({"type", "secrets", "audit", "sha256"})


def _check_end(value: dict[str, Any], found: Checked) -> None:
    """The end line's counts and SHA-256 against the file's. ``receipts`` is there only in
    a file holding receipts (absent: none), so files without them end as they always did."""
    if not END_FIELDS <= set(value) <= END_FIELDS | {"receipts"}:
        raise TransferRefused("its end line is damaged")
    receipts = value.get("receipts", 0)
    if type(receipts) is not int:
        raise TransferRefused("its end line is damaged")
    if receipts or found.receipts:
        if (value["secrets"], receipts, value["audit"]) != (
            found.secrets,
            found.receipts,
            found.audit,
        ):
            raise TransferRefused(
                f"it is damaged: its end line counts {value['secrets']} secrets, {receipts} "
                f"receipts and {value['audit']} audit records, the file holds "
                f"{found.secrets}, {found.receipts} and {found.audit}"
            )
    elif value["secrets"] != found.secrets or value["audit"] != found.audit:
        raise TransferRefused(
            f"it is damaged: its end line counts {value['secrets']} secrets and "
            f"{value['audit']} audit records, the file holds {found.secrets} and {found.audit}"
        )
    if value["sha256"] != found.sha256:
        raise TransferRefused("it is damaged or altered: its SHA-256 does not match its end line")


def _records(
    copy: IO[bytes], version: int
) -> Iterator[tuple[int, StoredSecret | Receipt | dict[str, Any]]]:
    """The records of a checked copy, with their line numbers in the original file."""
    for number, data in _lines(copy):
        value = json.loads(data)
        line = number + 1  # the copy has no header line
        if value["type"] == "secret":
            yield line, parse_secret(value, line, version)
        elif value["type"] == "receipt":
            yield line, parse_receipt(value, line)
        else:
            yield line, parse_audit(value, line)


def import_(
    open_store: Callable[[], BulkStore],
    source: IO[bytes],
    *,
    bar: Bar,
    conflict: Callable[[int], None],
    known_readers: KnownReaders | None = None,
) -> Counts:
    """Check ``source`` whole, then open the store and add its records; ``conflict(line)``
    is called for each record left untouched because the store holds another under its id.
    A file refused leaves the store as it was (not even created).

    ``known_readers`` gives the names of the importing server's API keys of a tenant (None:
    it has no API keys). A record naming a reader that is none of them is stored all the
    same (the record is the truth: the key may be added later) and counted in
    ``unknown_readers``."""
    counts = Counts()
    with tempfile.TemporaryFile(prefix="secret-manager-import-") as copy:
        with bar("checking", None) as advance:
            checked = check_and_copy(source, copy, advance)
        counts.sha256 = checked.sha256
        copy.seek(0)
        store = open_store()
        counts.store = store.label
        try:
            _add(
                store,
                copy,
                checked,
                counts,
                bar=bar,
                conflict=conflict,
                unknown=_unknown_readers(known_readers),
            )
        finally:
            store.close()
    return counts


def _add(
    store: BulkStore,
    copy: IO[bytes],
    checked: Checked,
    counts: Counts,
    *,
    bar: Bar,
    conflict: Callable[[int], None],
    unknown: Callable[[SealedSecret], bool],
) -> None:
    """Add the checked records in ``copy`` to ``store``, a batch at a time."""
    now = utc_now()
    secrets: list[tuple[int, StoredSecret]] = []
    receipts: list[Receipt] = []
    audit: list[dict[str, Any]] = []
    with bar("importing", checked.secrets + checked.receipts + checked.audit) as advance:

        def flush() -> None:
            if secrets:
                outcomes = store.add_secrets([record for _, record in secrets])
                for (line, record), outcome in zip(secrets, outcomes, strict=True):
                    _count(counts, outcome)
                    if outcome is Imported.NEW and keyed_by_id(record.sealed.record_key):
                        counts.keyed_by_id += 1
                    if outcome is Imported.CONFLICT:
                        conflict(line)
                    elif unknown(record.sealed):  # held now as the file has it
                        counts.unknown_readers += 1
                advance(len(secrets))
                secrets.clear()
            if receipts:
                counts.receipts_new += store.add_receipts(receipts)
                advance(len(receipts))
                receipts.clear()
            if audit:
                counts.audit_new += store.add_audit(audit)
                advance(len(audit))
                audit.clear()

        for line, record in _records(copy, checked.version):
            if isinstance(record, StoredSecret):
                counts.secrets += 1
                if record.sealed.expired(now):
                    counts.left_out += 1  # expired since the export: never served again
                    advance(1)
                    continue
                secrets.append((line, record))
            elif isinstance(record, Receipt):
                # Kept whatever became of its secret: the purge here ends it in its time.
                counts.receipts += 1
                receipts.append(record)
            else:
                counts.audit += 1
                audit.append(record)
            if len(secrets) + len(receipts) + len(audit) >= BATCH:
                flush()
        flush()


def _unknown_readers(known_readers: KnownReaders | None) -> Callable[[SealedSecret], bool]:
    """Whether a record names a reader that is no API key of its tenant (every record that
    names readers, for a server without API keys); each tenant's names asked once."""
    names: dict[str, Collection[str]] = {}

    def unknown(sealed: SealedSecret) -> bool:
        if sealed.readers is None:
            return False
        if known_readers is None:
            return True
        if sealed.tenant not in names:
            names[sealed.tenant] = known_readers(sealed.tenant)
        known = names[sealed.tenant]
        return any(reader not in known for reader in sealed.readers)

    return unknown


def _count(counts: Counts, outcome: Imported) -> None:
    if outcome is Imported.NEW:
        counts.new += 1
    elif outcome is Imported.PRESENT:
        counts.present += 1
    elif outcome is Imported.FEWER_READS:
        counts.fewer_reads += 1
    elif outcome is Imported.MORE_FAILURES:
        counts.more_failures += 1
    else:
        counts.conflicts += 1


def failures() -> tuple[type[Exception], ...]:
    """What a command can meet that is no fault of the file: a store that fails (unreachable,
    refusing, disk full) or a file system error."""
    from pymongo.errors import PyMongoError

    return (sqlite3.Error, PyMongoError, OSError)


def elapsed_since(started: float) -> str:
    """Seconds since ``started`` (perf_counter) for a summary line."""
    return f"{time.perf_counter() - started:.1f} s"
