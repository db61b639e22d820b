"""A batch of creates in one command: MongoDB 8.0's client-level ``bulkWrite``.

Everything a batch of creates writes (idempotency keys claimed, secrets, keys marked done,
receipts, outbox events, audit records) goes in one ordered ``bulkWrite``, in that order
of kinds. Ordered, so that what depends on a secret being stored is written only once it
is: the server stops at the first refusal, having written everything before it and nothing
after. The refused write is judged alone (a secret's refusal fails its own create; a
refused claim of a key is settled as ``idempotency.claim`` settles one; an audit record's
refusal is that record's), and the writes not yet made are sent again without it. Without a refusal,
which is what a batch almost always meets, a batch is one round trip where the two-command
path (``_insert_many_sync`` in store.py, kept for servers before 8.0) makes two or more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

from pymongo import DeleteOne, InsertOne, MongoClient, UpdateOne
from pymongo.errors import (
    ClientBulkWriteException,
    OperationFailure,
    WriteConcernError,
    WriteError,
)
from pymongo.write_concern import WriteConcern

from vault.records import IdempotentCreate
from vault.stores.base import IdempotentRepeat
from vault.stores.mongo import idempotency
from vault.stores.mongo.documents import DUPLICATE_KEY

# The wire version of MongoDB 8.0, the first with the client-level bulkWrite command.
BULK_WRITE_WIRE_VERSION = 25
# What a server answers a command it will not run: CommandNotSupported (an 8.0 whose
# featureCompatibilityVersion is still 7.0, as after upgrading the binaries and before
# setFeatureCompatibilityVersion), CommandNotFound (a server without the command).
REFUSED_COMMAND = frozenset({115, 59})


Kind = Literal["forget", "claim", "secret", "done", "receipt", "event", "audit"]
Model = InsertOne[dict[str, Any]] | UpdateOne | DeleteOne


def supports_bulk_write(client: MongoClient[dict[str, Any]]) -> bool:
    """Whether every server the client knows speaks MongoDB 8.0's wire version or later
    (during a rolling upgrade some do not). False before the client has met any: the
    first batch then takes the two-command path."""
    servers = client.topology_description.known_servers
    return bool(servers) and all(s.max_wire_version >= BULK_WRITE_WIRE_VERSION for s in servers)


@dataclasses.dataclass(frozen=True)
class Namespaces:
    """The ``database.collection`` names a create batch writes to."""

    secrets: str
    idempotency: str
    receipts: str
    outbox: str
    audit: str


@dataclasses.dataclass(frozen=True)
class CreateWrites:
    """What one create writes: its secret's document, and beside it (None when it has
    none) its receipt's, its outbox event's, its audit record's, and its idempotent key."""

    secret: dict[str, Any]
    receipt: dict[str, Any] | None
    event: dict[str, Any] | None
    audit: dict[str, Any] | None
    idempotent: IdempotentCreate | None


@dataclasses.dataclass(frozen=True)
class _Write:
    item: int
    kind: Kind
    model: Model


def _writes(names: Namespaces, creates: Sequence[CreateWrites]) -> list[_Write]:
    """Every write of the batch, in the order they must be made (by kind, then item)."""
    by_kind: dict[Kind, list[_Write]] = {kind: [] for kind in _ORDER}
    for k, create in enumerate(creates):
        idem = create.idempotent
        if idem is not None:
            claim = InsertOne(idempotency.pending_document(idem), namespace=names.idempotency)
            by_kind["claim"].append(_Write(k, "claim", claim))
            done = UpdateOne({"_id": idem.key}, idempotency.MARK_DONE, namespace=names.idempotency)
            by_kind["done"].append(_Write(k, "done", done))
        by_kind["secret"].append(
            _Write(k, "secret", InsertOne(create.secret, namespace=names.secrets))
        )
        beside: tuple[tuple[Kind, dict[str, Any] | None, str], ...] = (
            ("receipt", create.receipt, names.receipts),
            ("event", create.event, names.outbox),
            ("audit", create.audit, names.audit),
        )
        for kind, doc, namespace in beside:
            if doc is not None:
                by_kind[kind].append(_Write(k, kind, InsertOne(doc, namespace=namespace)))
    return [write for kind in _ORDER for write in by_kind[kind]]


_ORDER: tuple[Kind, ...] = ("forget", "claim", "secret", "done", "receipt", "event", "audit")


def write_creates(
    client: MongoClient[dict[str, Any]],
    names: Namespaces,
    creates: Sequence[CreateWrites],
    *,
    write_concern: WriteConcern,
    claim_again: Callable[[IdempotentCreate], IdempotentCreate | None],
    secret_stored: Callable[[dict[str, Any]], bool],
    audit_stored: Callable[[dict[str, Any]], bool],
) -> tuple[list[Exception | None], dict[int, Exception]] | None:
    """Write a batch of creates, in one command unless a write is refused; the error of
    each create's secret (None: stored, IdempotentRepeat: its key is taken), and the error
    of each refused audit record by its create's index. None: the server does not run
    bulkWrite (yet), and nothing was written.

    ``claim_again`` settles a refused claim, taken or perhaps stored after all
    (``idempotency.claim``: None once claimed); ``secret_stored`` and ``audit_stored``
    say whether a document refused as a duplicate is this very one, stored by an attempt
    whose answer was lost. A write concern not met, or a refusal of a receipt, an event or
    a key's update, fails the batch (raised), as on the two-command path."""
    pending = _writes(names, creates)
    failed: dict[int, Exception] = {}
    audit_errors: dict[int, Exception] = {}
    first = True
    while pending:
        try:
            client.bulk_write([w.model for w in pending], ordered=True, write_concern=write_concern)
            break
        except ClientBulkWriteException as exc:
            if exc.write_concern_errors:
                # Written perhaps, but not confirmed durable: nobody may be acknowledged.
                raise WriteConcernError("write concern not satisfied") from None
            not_run = isinstance(exc.error, OperationFailure) and exc.error.code in REFUSED_COMMAND
            if first and not_run:  # nothing of the batch is written yet
                return None
            if isinstance(exc.error, Exception):  # the call itself failed: no answer, say
                raise exc.error from None
            if not exc.write_errors:
                raise
            # The server's entries, as they came (typed as WriteError, they are documents).
            error = cast(Mapping[str, Any], exc.write_errors[0])
        first = False
        index = int(error["idx"])
        refused, rest = pending[index], pending[index + 1 :]
        k, duplicate = refused.item, error.get("code") == DUPLICATE_KEY
        own = WriteError(str(error.get("errmsg")), error.get("code"))
        again: list[_Write] = []
        idem = creates[k].idempotent
        if refused.kind == "claim" and idem is not None:  # taken, or perhaps stored after all
            existing = claim_again(idem)
            if existing is not None:
                failed[k] = IdempotentRepeat(existing)
        elif refused.kind == "secret":
            document = creates[k].secret
            if not (duplicate and secret_stored(document)):
                failed[k] = own
                if idem is not None:  # claimed before: a retry may claim it again
                    forget = DeleteOne(
                        {"_id": idem.key, "state": idempotency.PENDING},
                        namespace=names.idempotency,
                    )
                    again.append(_Write(k, "forget", forget))
        elif refused.kind == "audit":
            audit = creates[k].audit
            if not (duplicate and audit is not None and audit_stored(audit)):
                audit_errors[k] = own
        elif not (duplicate and refused.kind in ("receipt", "event")):
            raise own  # a retry's receipt or event is already there; anything else fails
        again += [w for w in rest if w.kind == "forget" or w.item not in failed]
        pending = again
    return [failed.get(k) for k in range(len(creates))], audit_errors
