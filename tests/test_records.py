"""vault/records.py: the record key a secret is stored under, and how a legacy key looks."""

from __future__ import annotations

import hashlib
import uuid

from vault.records import RECORD_KEY_LENGTH, keyed_by_id, record_key


def test_the_record_key_is_the_labelled_sha256_of_the_canonical_id() -> None:
    secret_id = str(uuid.uuid4())
    key = record_key(secret_id)
    expected = hashlib.sha256(b"secret-manager record key v1\0" + secret_id.encode()).hexdigest()
    assert key == expected
    assert len(key) == RECORD_KEY_LENGTH and set(key) <= set("0123456789abcdef")
    assert record_key(secret_id.upper()) == key  # one key per id, however it is spelled
    assert secret_id not in key
    # Not a bare SHA-256 of the id: the label keeps it apart from any other use of one.
    assert key != hashlib.sha256(secret_id.encode()).hexdigest()


def test_distinct_ids_get_distinct_keys_and_a_key_is_told_from_an_id() -> None:
    ids = [str(uuid.uuid4()) for _ in range(1000)]
    keys = {record_key(secret_id) for secret_id in ids}
    assert len(keys) == len(ids)
    assert not any(keyed_by_id(key) for key in keys)
    assert all(keyed_by_id(secret_id) for secret_id in ids)
