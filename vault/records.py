"""The shape a secret is stored in: what crypto produces and every store keeps.

It sits apart from the stores and from crypto, and imports nothing from the project or
from third parties, so that loading the keyring (``vault.crypto``) never loads a database
driver, Prometheus or OpenTelemetry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SealedSecret:
    """One encrypted secret as it is stored: nonce, ciphertext and key id, never plaintext."""

    secret_id: str
    key_id: str
    nonce: bytes
    ciphertext: bytes
