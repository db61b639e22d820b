"""The shape a secret is stored in: what crypto produces and every store keeps.

It sits apart from the stores and from crypto, and imports nothing from the project or
from third parties, so that loading the keyring (``vault.crypto``) never loads a database
driver, Prometheus or OpenTelemetry.

A record is stored under its record key, a one-way digest of its secret id, never under
the id: the id is a bearer token (whoever holds it fetches the plaintext), so nothing that
reads the database, a backup or an export learns one. Records written before that are
stored under the id itself (legacy records) until ``secret-manager rewrap`` converts them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any, NamedTuple

# Versioned, so that a future change of digest cannot be mistaken for this one.
_RECORD_KEY_LABEL = b"secret-manager record key v1\x00"
_RECEIPT_KEY_LABEL = b"secret-manager receipt key v1\x00"
_IDEMPOTENCY_KEY_LABEL = b"secret-manager idempotency key v1\x00"
# The tenant of a secret made without API keys, or by a key named without a tenant prefix.
DEFAULT_TENANT = "default"
RECORD_KEY_LENGTH = 64  # hex digits of a SHA-256
LEGACY_KEY_LENGTH = 36  # a UUID in its 8-4-4-4-12 form: a record stored under its id


def record_key(secret_id: str) -> str:
    """The key a secret's record is stored under: hex SHA-256 of a fixed label and the id
    in lower case.

    Unkeyed on purpose: an id carries 122 random bits, so neither guessing ids nor a
    precomputed table finds one from its digest, and a digest that needs no key keeps
    lookups, rotation and moving records between stores free of key management.
    """
    return hashlib.sha256(_RECORD_KEY_LABEL + secret_id.lower().encode("ascii")).hexdigest()


def receipt_key(receipt_id: str) -> str:
    """The key a receipt is stored under: hex SHA-256 of a fixed label and the receipt id in
    lower case, as ``record_key`` is for a secret (so a status query sends no receipt id
    to the database, whose logs may quote queries)."""
    return hashlib.sha256(_RECEIPT_KEY_LABEL + receipt_id.lower().encode("ascii")).hexdigest()


def idempotency_key(tenant: str, key_name: str | None, header: str) -> str:
    """The key an idempotent create's record is stored under: hex SHA-256 of a fixed label,
    the scope (the API key's tenant and name; one shared scope without keys) and the
    client's Idempotency-Key, so two API keys' equal headers never meet."""
    scope = f"{tenant}\x00{key_name or ''}\x00{header}".encode()
    return hashlib.sha256(_IDEMPOTENCY_KEY_LABEL + scope).hexdigest()


def keyed_by_id(key: str) -> bool:
    """Whether a stored record key is a secret id itself (a legacy record, which
    ``rewrap`` converts) rather than its digest."""
    return len(key) == LEGACY_KEY_LENGTH


class Access(NamedTuple):
    """Who may see a record (the fields of SealedSecret of that name), as a store reads
    them for a delete without reading the whole record."""

    tenant: str = DEFAULT_TENANT
    owner: str | None = None
    readers: tuple[str, ...] | None = None


# Who may see a record whose access fields are malformed (a database edit): nobody through
# the API, and a delete through it refuses it like another tenant's.
NOBODY = Access(tenant="\x00malformed", owner=None, readers=())


@dataclass(frozen=True)
class SealedSecret:
    """One encrypted secret as it is stored: nonce, ciphertext and key id, never plaintext.

    ``record_key`` is the key it is stored under and its ciphertext is bound to: the digest
    of its secret id (``record_key(secret_id)``), or for a legacy record the id itself.

    ``expires_at`` (UTC, whole seconds) and ``reads_left`` are its lifecycle, None when it
    never expires or has no read limit. They are not part of the ciphertext's associated
    data: they change as the secret is read, and whoever can write the database can delete
    a record anyway.

    ``tenant``, ``owner`` and ``readers`` say who may see it: the tenant of the key that
    made it, and, when it was made for named ``readers`` (key names of that tenant), the
    name of the key that made it (``owner``, who may delete it). They are part of the
    associated data, so a record moved to another tenant or given another reader by a
    database edit no longer opens.
    """

    record_key: str
    key_id: str
    nonce: bytes
    ciphertext: bytes
    expires_at: dt.datetime | None = None
    reads_left: int | None = None
    tenant: str = DEFAULT_TENANT
    owner: str | None = None
    readers: tuple[str, ...] | None = None
    # A secret made with a receipt: its id (a capability to ask the secret's status, never
    # to read it; events carry it), and the creator's label, neither of them secret.
    receipt_id: str | None = None
    label: str | None = None
    # A secret under a passphrase: the marker of the key derivation its passphrase layer
    # was made with (vault/crypto.py SCRYPT_KDF; part of the associated data), and the
    # wrong passphrases tried so far (at PASSPHRASE_MAX_ATTEMPTS the secret is deleted).
    kdf: str | None = None
    passphrase_failures: int = 0

    def expired(self, now: dt.datetime) -> bool:
        """True once ``now`` has reached the expiry: the secret is never served again."""
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class IdempotentCreate:
    """What an idempotent create stores beside its secret, in the same store call: the
    digest of its request body and its answer, sealed like a secret (it names the secret
    id, which is never stored in clear), so that a repeat gets that very answer.

    ``state`` is ``done`` once the secret is stored; ``pending`` only on MongoDB, between
    the two writes of one create (a repeat then meets a create still in flight)."""

    key: str  # idempotency_key(...)
    body_digest: str  # hex SHA-256 of the request body
    answer: SealedSecret  # the answer's bytes, sealed under the key (record_key = key)
    record_key: str  # the secret's, to find whether a create cut short stored it
    created_at: dt.datetime
    expires_at: dt.datetime
    state: str = "done"


class ReceiptState:
    """What became of a secret, as its receipt says."""

    ACTIVE = "active"
    USED_UP = "used_up"
    EXPIRED = "expired"
    DELETED = "deleted"


@dataclass(frozen=True)
class Receipt:
    """What a receipt keeps of a secret's life, stored apart from the secret so that it
    outlives it (until RECEIPT_RETENTION_SECONDS after its end). Times are UTC; ``reads``
    counts the fetches served; ``ended_at`` is set when the secret is used up, deleted or
    found expired (an expiry not yet found is judged from ``expires_at`` on reading)."""

    receipt_key: str
    tenant: str
    label: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    max_reads: int | None
    reads: int = 0
    # For a secret under a passphrase: the wrong passphrases tried (None: it has none).
    passphrase_failures: int | None = None
    first_read_at: dt.datetime | None = None
    last_read_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    state: str = ReceiptState.ACTIVE

    @classmethod
    def of(cls, record: SealedSecret, created_at: dt.datetime) -> Receipt:
        """The receipt of a secret made with one, as it is when the secret is stored."""
        if record.receipt_id is None:
            raise ValueError("the record has no receipt")
        return cls(
            receipt_key=receipt_key(record.receipt_id),
            tenant=record.tenant,
            label=record.label,
            created_at=created_at,
            expires_at=record.expires_at,
            max_reads=record.reads_left,
            passphrase_failures=None if record.kdf is None else record.passphrase_failures,
        )


@dataclass(frozen=True)
class StoredSecret:
    """A record with the time it was stored, as export and import carry it between stores.

    ``created_at`` is None only for a record written before stores kept that time.
    """

    sealed: SealedSecret
    created_at: dt.datetime | None


def access_fields(record: SealedSecret) -> dict[str, Any]:
    """Who may see ``record``, as a document or an export line stores it: only the fields
    that differ from a plain secret's (the default tenant, no owner, no named readers), so
    a plain secret is stored and exported exactly as before tenants existed."""
    fields: dict[str, Any] = {}
    if record.tenant != DEFAULT_TENANT:
        fields["tenant"] = record.tenant
    if record.owner is not None:
        fields["owner"] = record.owner
    if record.readers is not None:
        fields["readers"] = list(record.readers)
    return fields


def receipt_fields(record: SealedSecret) -> dict[str, Any]:
    """A secret's receipt id and label, as a document or an export line stores them: only
    those that are set, so a secret made without them is stored and exported as before."""
    fields: dict[str, Any] = {}
    if record.receipt_id is not None:
        fields["receipt_id"] = record.receipt_id
    if record.label is not None:
        fields["label"] = record.label
    return fields


def passphrase_fields(record: SealedSecret) -> dict[str, Any]:
    """A secret's passphrase marker and wrong tries, as a document or an export line stores
    them: only for a secret under a passphrase, so any other is stored as before."""
    if record.kdf is None:
        return {}
    return {"kdf": record.kdf, "passphrase_failures": record.passphrase_failures}
