"""AES-256-GCM sealing under a keyring of one active key and any number of older keys.

Every record carries the id of the key that sealed it, so keys rotate without a data
migration. The associated data binds a ciphertext to its record key (vault/records.py: the
digest of its secret id, or for a legacy record the id itself) and key id: copied onto
another record it fails authentication instead of yielding someone else's plaintext. The
id is not needed to re-seal a record, so key rotation works on what the store holds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vault.errors import DecryptionFailed, MalformedKey, UnknownKey
from vault.records import SealedSecret

KEY_BYTES = 32
NONCE_BYTES = 12  # 96 bits, the size GCM is specified for
_KEY_ID_LABEL = b"secret-manager key id v1"
_AAD_PREFIX = b"secret-manager/v1\x00"
_AUDIT_KEY_INFO = b"secret-manager audit hmac v1"


def generate_key() -> str:
    """A new random key as standard base64 of 32 bytes, as MASTER_KEY expects it."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def parse_key(value: str) -> bytes:
    """Accept base64 of 32 bytes, or a raw 32-character ASCII string (older deployments)."""
    if len(value) == 44:
        try:
            decoded = base64.b64decode(value, validate=True)
        except binascii.Error:
            decoded = b""
        if len(decoded) == KEY_BYTES:
            return decoded
    if len(value) == KEY_BYTES and value.isascii():
        return value.encode("ascii")
    # Only the length is reported: the value itself is key material.
    raise MalformedKey(
        "expected the base64 of 32 bytes (44 characters, as `secret-manager genkey` prints) "
        f"or a raw 32-character ASCII string; got {len(value)} characters"
    )


def key_id(key: bytes) -> str:
    """A short, stable identifier for a key: a PRF output, so it reveals nothing about it."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


def _aad(record_key: str, kid: str) -> bytes:
    return _AAD_PREFIX + kid.encode("ascii") + b"\x00" + record_key.encode("ascii")


class Keyring:
    """One AESGCM object per key, built once; seals with the active key, opens with any."""

    def __init__(self, active: bytes, previous: Iterable[bytes] = ()) -> None:
        keys = [active, *previous]
        for key in keys:
            if len(key) != KEY_BYTES:
                raise MalformedKey(f"AES-256 keys are {KEY_BYTES} bytes, got {len(key)}")
        self.active_key_id = key_id(active)
        self._ciphers: dict[str, AESGCM] = {}
        for key in keys:
            self._ciphers.setdefault(key_id(key), AESGCM(key))

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of every key held, the active one first."""
        return tuple(self._ciphers)

    def seal(self, record_key: str, plaintext: bytes) -> SealedSecret:
        """Encrypt under the active key with a fresh random nonce, bound to ``record_key``
        (``vault.records.record_key`` of the secret id)."""
        nonce = os.urandom(NONCE_BYTES)
        kid = self.active_key_id
        ciphertext = self._ciphers[kid].encrypt(nonce, plaintext, _aad(record_key, kid))
        return SealedSecret(record_key=record_key, key_id=kid, nonce=nonce, ciphertext=ciphertext)

    def open(self, sealed: SealedSecret) -> bytes:
        """Decrypt a record; raise UnknownKey or DecryptionFailed, never return wrong bytes."""
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise UnknownKey("record sealed by a key that is not configured")
        if len(sealed.nonce) != NONCE_BYTES:
            raise DecryptionFailed("record has a malformed nonce")
        try:
            return cipher.decrypt(
                sealed.nonce, sealed.ciphertext, _aad(sealed.record_key, sealed.key_id)
            )
        except InvalidTag:
            raise DecryptionFailed("record failed authentication") from None


def derive_audit_key(master_key: bytes) -> bytes:
    """The default audit HMAC key: HKDF-SHA256 of the master key, independent of it."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_AUDIT_KEY_INFO).derive(
        master_key
    )


def secret_id_hmac(audit_key: bytes, secret_id: str) -> str:
    """How a secret id appears in the audit log: HMAC-SHA256, hex. Ids are lower-cased."""
    return hmac.digest(audit_key, secret_id.lower().encode("ascii"), "sha256").hex()
