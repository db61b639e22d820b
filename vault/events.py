"""Lifecycle events: what a webhook tells a receiver became of a secret.

An event is made in the store call that makes the change it reports (a create, a read, the
read that uses a secret up, a delete, an expiry found by the purge, a refusal) and written
to the store's outbox in that same call, so an acknowledged change never loses its event.
A deliverer (vault/webhooks.py) drains the outbox. Pure data: no I/O here.

An event never holds a secret, nor a secret id in clear (its audit HMAC stands for it).
"""

from __future__ import annotations

import datetime as dt
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
