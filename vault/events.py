"""Lifecycle events: what a webhook tells a receiver became of a secret.

An event is made in the store call that makes the change it reports (a create, a read, the
read that uses a secret up, a delete, an expiry found by the purge, a refusal) and written
to the store's outbox in that same call, so an acknowledged change never loses its event.
A deliverer (vault/webhooks.py) drains the outbox. Pure data: no I/O here.

An event never holds a secret, nor a secret id in clear (its audit HMAC stands for it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

CREATED = "secret.created"
READ = "secret.read"
USED_UP = "secret.used_up"
EXPIRED = "secret.expired"
DELETED = "secret.deleted"
DENIED = "secret.denied"
EVENT_TYPES = (CREATED, READ, USED_UP, EXPIRED, DELETED, DENIED)


def new_event_id() -> str:
    """``msg_`` and 28 hex digits, time-ordered to the second then random: the webhook-id
    of every delivery of the event (Standard Webhooks), fixed when the event is made."""
    return f"msg_{int(time.time()) & 0xFFFFFFFF:08x}{secrets.token_hex(10)}"


def derived_event_id(record_key: str, type: str) -> str:
    """The id of an event that happens once to a record (its expiry), whoever notices it:
    a digest of the record key and the type, so every process that finds it makes the
    same event, which an outbox stores once."""
    digest = hashlib.sha256(f"secret-manager event v1\x00{type}\x00{record_key}".encode())
    return f"msg_{digest.hexdigest()[:28]}"


@dataclass(frozen=True, slots=True)
class Event:
    """One lifecycle event: ``type`` one of EVENT_TYPES, ``at`` when the change happened
    (UTC), ``data`` the JSON object a delivery's ``data`` carries."""

    type: str
    at: dt.datetime
    data: dict[str, Any]
    id: str = field(default_factory=new_event_id)

    def payload(self) -> dict[str, Any]:
        """The body a delivery sends: ``{"type", "timestamp", "data"}``."""
        timestamp = self.at.astimezone(dt.UTC).isoformat(timespec="milliseconds")
        return {"type": self.type, "timestamp": timestamp.replace("+00:00", "Z"), "data": self.data}


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change, as its events name them: the request's key (name and tenant, None
    without API keys), its client address, and the audit HMAC of the secret id. None for a
    change no request made (an expiry found by the purge)."""

    key_name: str | None = None
    tenant: str | None = None
    client_ip: str | None = None
    secret_id_hmac: str | None = None


def _seconds(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def secret_event(
    type: str,
    at: dt.datetime,
    *,
    tenant: str,
    receipt_id: str | None,
    label: str | None,
    reads_left: int | None,
    expires_at: dt.datetime | None,
    actor: Actor | None,
) -> Event:
    """The event of a change to one secret: its receipt id and label (null without), its
    tenant, reads left and expiry, and who made the change (their key's name and tenant,
    which for a refusal may be another tenant's). Never the secret, never its
    id (its audit HMAC stands for it, when a request named it)."""
    return Event(
        type=type,
        at=at,
        data={
            "receipt_id": receipt_id,
            "label": label,
            "secret_id_hmac": None if actor is None else actor.secret_id_hmac,
            "tenant": tenant,
            "key_name": None if actor is None else actor.key_name,
            "key_tenant": None if actor is None else actor.tenant,
            "client_ip": None if actor is None else actor.client_ip,
            "reads_left": reads_left,
            "expires_at": _seconds(expires_at),
        },
    )


def event_body(event: Event) -> str:
    """The body every delivery of ``event`` sends and signs: its payload as compact JSON,
    ASCII only (whatever a label holds, the signed bytes read alike in any language). Made
    once, when the event is written to the outbox, and stored: every retry sends exactly
    these bytes."""
    return json.dumps(event.payload(), separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event in a store's outbox, as a deliverer claimed it: the event, the body stored
    for it (``event_body``), the delivery attempts made so far, when it was written to the
    outbox (the store's clock; its age counts from then) and the receivers that have it
    already (their digests, vault/webhooks.py), which are not sent it again."""

    event: Event
    body: str
    attempts: int
    created_at: dt.datetime
    delivered_to: frozenset[str] = frozenset()
