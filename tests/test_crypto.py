"""vault/crypto.py: sealing, binding to the record, key parsing and the keyring."""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT, clean_env
from vault.crypto import NONCE_BYTES, Keyring, generate_key, key_id, parse_key
from vault.errors import DecryptionFailed, MalformedKey, UnknownKey
from vault.records import record_key


def _id() -> str:
    """A record key, as the service seals a new secret under: the digest of a new id."""
    return record_key(str(uuid.uuid4()))


def test_round_trip_and_fresh_nonce_per_seal() -> None:
    ring = Keyring(os.urandom(32))
    secret_id = _id()
    first = ring.seal(secret_id, b"hunter2")
    second = ring.seal(secret_id, b"hunter2")
    assert len(first.nonce) == NONCE_BYTES == 12
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext
    assert b"hunter2" not in first.ciphertext
    assert ring.open(first) == ring.open(second) == b"hunter2"


def test_ciphertext_copied_onto_another_record_fails() -> None:
    ring = Keyring(os.urandom(32))
    sealed = ring.seal(_id(), b"alice's secret")
    moved = dataclasses.replace(sealed, record_key=record_key(_id()))
    with pytest.raises(DecryptionFailed):
        ring.open(moved)


def test_a_legacy_record_bound_to_its_id_opens_and_only_under_that_id() -> None:
    # Sealed as the previous version sealed: the id itself is the record key, in the AAD.
    ring = Keyring(os.urandom(32))
    secret_id = str(uuid.uuid4())
    legacy = ring.seal(secret_id, b"from before")
    assert ring.open(legacy) == b"from before"
    with pytest.raises(DecryptionFailed):  # not under its digest: converting re-seals it
        ring.open(dataclasses.replace(legacy, record_key=record_key(secret_id)))


@pytest.mark.parametrize("field", ["nonce", "ciphertext"])
def test_any_flipped_bit_is_detected(field: str) -> None:
    ring = Keyring(os.urandom(32))
    sealed = ring.seal(_id(), b"x" * 40)
    original = getattr(sealed, field)
    for bit in range(0, len(original) * 8, 7):
        flipped = bytearray(original)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptionFailed):
            ring.open(dataclasses.replace(sealed, **{field: bytes(flipped)}))


def test_key_id_is_bound_into_the_ciphertext() -> None:
    old, new = os.urandom(32), os.urandom(32)
    ring = Keyring(new, [old])
    sealed = ring.seal(_id(), b"data")
    relabelled = dataclasses.replace(sealed, key_id=key_id(old))
    with pytest.raises(DecryptionFailed):
        ring.open(relabelled)


def test_previous_keys_open_old_records_and_new_ones_use_the_active_key() -> None:
    old, new = os.urandom(32), os.urandom(32)
    sealed_by_old = Keyring(old).seal(_id(), b"before rotation")
    ring = Keyring(new, [old])
    assert ring.open(sealed_by_old) == b"before rotation"
    assert ring.seal(_id(), b"after").key_id == key_id(new) == ring.active_key_id
    assert ring.key_ids == (key_id(new), key_id(old))


def test_record_from_an_unconfigured_key_is_refused() -> None:
    sealed = Keyring(os.urandom(32)).seal(_id(), b"data")
    with pytest.raises(UnknownKey):
        Keyring(os.urandom(32)).open(sealed)


def test_key_id_is_stable_short_and_not_the_key() -> None:
    key = os.urandom(32)
    assert key_id(key) == key_id(key)
    assert key_id(key) != key_id(os.urandom(32))
    assert len(key_id(key)) == 16
    assert key.hex()[:16] != key_id(key)


def test_parse_key_accepts_base64_and_raw_32_characters() -> None:
    generated = generate_key()
    assert parse_key(generated) == base64.b64decode(generated)
    raw = "0123456789abcdef0123456789ABCDEF"
    assert parse_key(raw) == raw.encode()


@pytest.mark.parametrize(
    "value",
    [
        "",
        "short",
        "0123456789abcdef0123456789ABCDE",  # 31 characters
        base64.b64encode(os.urandom(31)).decode(),  # base64 of the wrong length
        base64.b64encode(os.urandom(33)).decode(),
        "é" * 32,  # 32 characters, not 32 bytes
    ],
)
def test_parse_key_rejects_everything_else_without_echoing_it(value: str) -> None:
    with pytest.raises(MalformedKey) as excinfo:
        parse_key(value)
    if value:
        assert value not in str(excinfo.value)


def test_generated_keys_are_random_32_bytes() -> None:
    keys = {generate_key() for _ in range(5)}
    assert len(keys) == 5
    assert all(len(base64.b64decode(k, validate=True)) == 32 for k in keys)


def test_importing_crypto_loads_no_driver_metrics_or_tracing() -> None:
    # The keyring is what the rewrap and genkey paths load: it must stay light, so the
    # stored shape it produces lives in vault/records.py, apart from the stores.
    heavy = ("prometheus_client", "opentelemetry", "bson", "pymongo")
    probe = (
        "import sys, vault.crypto; "
        f"print(','.join(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == ""
