"""The shape a secret is stored in: what crypto produces and every store keeps.

It sits apart from the stores and from crypto, and imports nothing from the project or
from third parties, so that loading the keyring (``vault.crypto``) never loads a database
driver, Prometheus or OpenTelemetry.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class SealedSecret:
    """One encrypted secret as it is stored: nonce, ciphertext and key id, never plaintext.

    ``expires_at`` (UTC, whole seconds) and ``reads_left`` are its lifecycle, None when it
    never expires or has no read limit. They are not part of the ciphertext's associated
    data: they change as the secret is read, and whoever can write the database can delete
    a record anyway.
    """

    secret_id: str
    key_id: str
    nonce: bytes
    ciphertext: bytes
    expires_at: dt.datetime | None = None
    reads_left: int | None = None

    def expired(self, now: dt.datetime) -> bool:
        """True once ``now`` has reached the expiry: the secret is never served again."""
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class StoredSecret:
    """A record with the time it was stored, as export and import carry it between stores.

    ``created_at`` is None only for a record written before stores kept that time.
    """

    sealed: SealedSecret
    created_at: dt.datetime | None
