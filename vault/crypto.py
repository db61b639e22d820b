"""AES-256-GCM sealing under a keyring of one active key and any number of older keys.

Every record carries the id of the key that sealed it, so keys rotate without a data
migration. The associated data binds a ciphertext to its record key (vault/records.py: the
digest of its secret id, or for a legacy record the id itself) and key id: copied onto
another record it fails authentication instead of yielding someone else's plaintext. It
binds who may see it too (tenant, owner, readers): a record of the default tenant made for
no named readers keeps the original associated data, any other adds those. The id is not
needed to re-seal a record, so key rotation works on what the store holds.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vault.errors import DecryptionFailed, MalformedKey, UnknownKey
from vault.records import DEFAULT_TENANT, SealedSecret

KEY_BYTES = 32
NONCE_BYTES = 12  # 96 bits, the size GCM is specified for
_KEY_ID_LABEL = b"secret-manager key id v1"
_AAD_PREFIX = b"secret-manager/v1\x00"
_AAD_ACCESS_PREFIX = b"secret-manager/v2\x00"
_AAD_PASSPHRASE_PREFIX = b"secret-manager/v3\x00"
_PASSPHRASE_SALT_LABEL = b"secret-manager passphrase salt v1\x00"
_PASSPHRASE_AAD = b"secret-manager passphrase layer v1"
# scrypt at OWASP's cost (N*r*p = 2^17 * 8): N = 2^15, r = 8, p = 3, so 32 MiB a derivation
# (the memory that makes a GPU guess dear) and about 0.2 s of one core on the machine of
# docs/performance.md. Stored on every record as its marker, so a later change of cost
# leaves every stored secret opening with the cost it was sealed with.
SCRYPT_KDF = "scrypt:32768:8:3"
_MAX_SCRYPT = (2**20, 32, 16)  # what a stored marker may ask for, at most
_AUDIT_KEY_INFO = b"secret-manager audit hmac v1"
_DIGEST_KEY_INFO = b"secret-manager request digest v1"


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


def _aad(
    record_key: str,
    kid: str,
    tenant: str = DEFAULT_TENANT,
    owner: str | None = None,
    readers: tuple[str, ...] | None = None,
    kdf: str | None = None,
) -> bytes:
    bound = _AAD_PREFIX + kid.encode("ascii") + b"\x00" + record_key.encode("ascii")
    if kdf is not None:
        # A secret under a passphrase binds the marker of its inner layer too: a record
        # stripped of it by a database edit fails authentication rather than answering the
        # inner ciphertext as if it were the secret.
        plain = _aad(record_key, kid, tenant, owner, readers)
        return _AAD_PASSPHRASE_PREFIX + plain + b"\x00" + kdf.encode("ascii")
    if tenant == DEFAULT_TENANT and owner is None and readers is None:
        return bound  # what every record was sealed with before tenants existed
    # Names are printable ASCII without NUL or commas (the key-name rule), so this
    # encoding is unambiguous; None and an empty value differ by their marker.
    access = [
        tenant,
        "-" if owner is None else f"+{owner}",
        "-" if readers is None else "+" + ",".join(readers),
    ]
    return _AAD_ACCESS_PREFIX + bound[len(_AAD_PREFIX) :] + b"\x00" + "\x00".join(access).encode()


class Keyring:
    """One AESGCM object per key, built once; seals with the active key, opens with any."""

    def __init__(self, active: bytes, previous: Iterable[bytes] = ()) -> None:
        keys = [active, *previous]
        for key in keys:
            if len(key) != KEY_BYTES:
                raise MalformedKey(f"AES-256 keys are {KEY_BYTES} bytes, got {len(key)}")
        self.active_key_id = key_id(active)
        self._ciphers: dict[str, AESGCM] = {}
        self._digest_keys: dict[str, bytes] = {}
        for key in keys:
            self._ciphers.setdefault(key_id(key), AESGCM(key))
            self._digest_keys.setdefault(
                key_id(key),
                HKDF(hashes.SHA256(), length=32, salt=None, info=_DIGEST_KEY_INFO).derive(key),
            )

    def digest(self, data: bytes, kid: str | None = None) -> str:
        """``<key id>:<hex>``: HMAC-SHA256 of ``data`` under a key derived from the active key
        (or key ``kid``). What a request body is remembered by: unlike a bare hash, it
        lets nobody who reads the database test guesses of what the body held."""
        kid = self.active_key_id if kid is None else kid
        return f"{kid}:{hmac.digest(self._digest_keys[kid], data, 'sha256').hex()}"

    def same_digest(self, stored: str, data: bytes) -> bool:
        """Whether ``stored`` (``digest``'s, under any configured key; or the bare hex
        SHA-256 written before digests were keyed) is the digest of ``data``."""
        kid, _, _ = stored.rpartition(":")
        if not kid:
            return hmac.compare_digest(stored, hashlib.sha256(data).hexdigest())
        if kid not in self._digest_keys:
            return False
        return hmac.compare_digest(stored, self.digest(data, kid))

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of every key held, the active one first."""
        return tuple(self._ciphers)

    def seal(
        self,
        record_key: str,
        plaintext: bytes,
        *,
        tenant: str = DEFAULT_TENANT,
        owner: str | None = None,
        readers: tuple[str, ...] | None = None,
        kdf: str | None = None,
    ) -> SealedSecret:
        """Encrypt under the active key with a fresh random nonce, bound to ``record_key``
        (``vault.records.record_key`` of the secret id) and to who may see it. With ``kdf``
        the plaintext is a passphrase layer (``lock``) made with that marker's key."""
        nonce = os.urandom(NONCE_BYTES)
        kid = self.active_key_id
        aad = _aad(record_key, kid, tenant, owner, readers, kdf)
        return SealedSecret(
            record_key=record_key,
            key_id=kid,
            nonce=nonce,
            ciphertext=self._ciphers[kid].encrypt(nonce, plaintext, aad),
            tenant=tenant,
            owner=owner,
            readers=readers,
            kdf=kdf,
        )

    def reseal(self, sealed: SealedSecret, plaintext: bytes, record_key: str) -> SealedSecret:
        """``sealed``'s plaintext sealed again under the active key, stored under
        ``record_key``, with its lifecycle and who may see it unchanged (key rotation). For
        a secret under a passphrase, ``plaintext`` is its passphrase layer, resealed as it
        is: rotation never needs (nor learns) the passphrase."""
        fresh = self.seal(
            record_key,
            plaintext,
            tenant=sealed.tenant,
            owner=sealed.owner,
            readers=sealed.readers,
            kdf=sealed.kdf,
        )
        return dataclasses.replace(
            fresh,
            expires_at=sealed.expires_at,
            reads_left=sealed.reads_left,
            passphrase_failures=sealed.passphrase_failures,
        )

    def open_locked(self, sealed: SealedSecret, key: bytes) -> bytes | None:
        """The plaintext of a secret under a passphrase, with ``key`` derived from it
        (``derive_passphrase_key``); None when ``key`` is not its passphrase's. Raises as
        ``open`` does when no configured key opens its outer layer."""
        return unlock(key, self.open(sealed))

    def open(self, sealed: SealedSecret) -> bytes:
        """Decrypt a record; raise UnknownKey or DecryptionFailed, never return wrong bytes."""
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise UnknownKey("record sealed by a key that is not configured")
        if len(sealed.nonce) != NONCE_BYTES:
            raise DecryptionFailed("record has a malformed nonce")
        try:
            return cipher.decrypt(
                sealed.nonce,
                sealed.ciphertext,
                _aad(
                    sealed.record_key,
                    sealed.key_id,
                    sealed.tenant,
                    sealed.owner,
                    sealed.readers,
                    sealed.kdf,
                ),
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


def _scrypt_params(kdf: str) -> tuple[int, int, int]:
    """N, r and p of a marker ``scrypt:N:r:p``; MalformedKey for anything else, or for a
    cost past what this service ever seals with (a marker edited in the database must not
    make a fetch take all memory)."""
    name, *numbers = kdf.split(":")
    # ASCII digits, a few of them: int() refuses other Unicode digits and very long numbers
    # with a ValueError, which must not escape as anything but an unknown marker.
    if name != "scrypt" or len(numbers) != 3 or not all(_small_number(n) for n in numbers):
        raise MalformedKey("unknown passphrase key derivation")
    n, r, p = (int(number) for number in numbers)
    if not (1 < n <= _MAX_SCRYPT[0] and n & (n - 1) == 0 and 0 < r <= _MAX_SCRYPT[1]):
        raise MalformedKey("unknown passphrase key derivation")
    if not 0 < p <= _MAX_SCRYPT[2]:
        raise MalformedKey("unknown passphrase key derivation")
    return n, r, p


def _small_number(text: str) -> bool:
    return 0 < len(text) <= 8 and text.isascii() and text.isdigit()


def known_kdf(kdf: object) -> bool:
    """Whether ``kdf`` is a passphrase key derivation marker this release derives keys
    with (within the costs it allows): what an import checks a record's marker against."""
    if not isinstance(kdf, str):
        return False
    try:
        _scrypt_params(kdf)
    except MalformedKey:
        return False
    return True


def derive_passphrase_key(passphrase: str, secret_id: str, kdf: str = SCRYPT_KDF) -> bytes:
    """The key of a secret's passphrase layer: scrypt (memory-hard) of the passphrase's
    UTF-8, salted with a digest of the secret id, so every secret has its own salt and
    the database, which never holds the id, does not hold the salt either. Slow on
    purpose (``SCRYPT_KDF``): call it off the event loop."""
    n, r, p = _scrypt_params(kdf)
    salt = hashlib.sha256(_PASSPHRASE_SALT_LABEL + secret_id.lower().encode("ascii")).digest()
    return Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def lock(key: bytes, plaintext: bytes) -> bytes:
    """The passphrase layer: AES-256-GCM under the passphrase's key, its random nonce
    first. The master key seals this in turn (``Keyring.seal`` with ``kdf``)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _PASSPHRASE_AAD)


def unlock(key: bytes, layer: bytes) -> bytes | None:
    """The plaintext of a passphrase layer, or None when ``key`` is not its passphrase's."""
    try:
        return AESGCM(key).decrypt(layer[:NONCE_BYTES], layer[NONCE_BYTES:], _PASSPHRASE_AAD)
    except (InvalidTag, ValueError):
        return None
