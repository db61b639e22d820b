"""Property tests (hypothesis): round trips, tamper detection and the strict validators.

Each property is checked on many generated inputs, not on a handful of hand-picked ones: any
bytes up to the limit come back byte for byte, any single flipped bit in a stored record is
detected, and the validators accept exactly the strict spellings docs/api.md promises.
"""

from __future__ import annotations

import base64
import binascii
import os
import string
import uuid
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from vault.crypto import Keyring
from vault.errors import DecryptionFailed, InvalidValue, UnknownKey
from vault.records import SealedSecret
from vault.validation import decode_secret, normalize_secret_id

# A small limit keeps every example fast; the boundary behaves the same at any size.
MAX = 2048

# The in-process client is built once per test and reused by every example on purpose.
reuse_client = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture
def small_client(make_client: Callable[..., TestClient]) -> TestClient:
    """The whole app (middleware, crypto, store) with MAX_SECRET_BYTES = MAX and no rate limit."""
    return make_client(MAX_SECRET_BYTES=str(MAX), RATE_LIMIT="off")


# --- round trips through the real API --------------------------------------------------------


@reuse_client
@given(plaintext=st.binary(min_size=1, max_size=MAX))
def test_any_bytes_up_to_the_limit_round_trip_exactly(
    small_client: TestClient, plaintext: bytes
) -> None:
    created = small_client.post("/vault/secret/create", json={"secret": b64(plaintext)})
    assert created.status_code == 200, created.text
    fetched = small_client.post(
        "/vault/secret/fetch", json={"secret_id": created.json()["secret_id"]}
    )
    assert fetched.status_code == 200, fetched.text
    assert base64.b64decode(fetched.json()["secret"], validate=True) == plaintext


@reuse_client
@given(size=st.integers(min_value=1, max_value=2 * MAX))
def test_a_secret_is_stored_exactly_when_it_fits_the_limit(
    small_client: TestClient, size: int
) -> None:
    response = small_client.post("/vault/secret/create", json={"secret": b64(os.urandom(size))})
    assert response.status_code == (200 if size <= MAX else 413), (size, response.text)


# --- tamper detection in Keyring.open ---------------------------------------------------------

# Each field and what a flipped bit in it raises: a key id no configured key has (another
# key's id is one bit away with negligible odds), or a record that fails authentication.
FIELDS: dict[str, type[Exception]] = {
    "ciphertext": DecryptionFailed,
    "nonce": DecryptionFailed,
    "key_id": UnknownKey,
}


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _tampered(sealed: SealedSecret, field: str, position: int) -> SealedSecret:
    if field == "key_id":
        raw = sealed.key_id.encode("latin-1")
        kid = _flip(raw, position % (8 * len(raw))).decode("latin-1")
        return SealedSecret(sealed.record_key, kid, sealed.nonce, sealed.ciphertext)
    if field == "nonce":
        nonce = _flip(sealed.nonce, position % (8 * len(sealed.nonce)))
        return SealedSecret(sealed.record_key, sealed.key_id, nonce, sealed.ciphertext)
    ciphertext = _flip(sealed.ciphertext, position % (8 * len(sealed.ciphertext)))
    return SealedSecret(sealed.record_key, sealed.key_id, sealed.nonce, ciphertext)


KEYS = [os.urandom(32) for _ in range(3)]


@settings(max_examples=300, deadline=None, database=None)
@given(
    plaintext=st.binary(min_size=0, max_size=256),
    field=st.sampled_from(list(FIELDS)),
    position=st.integers(min_value=0, max_value=8 * (256 + 16) - 1),
    sealed_by_previous=st.booleans(),
)
def test_any_single_bit_flip_is_detected(
    plaintext: bytes, field: str, position: int, sealed_by_previous: bool
) -> None:
    active, *previous = KEYS
    # Seal with either the active key or a previous one: both must detect tampering.
    sealer = Keyring(previous[0]) if sealed_by_previous else Keyring(active)
    reader = Keyring(active, previous)
    sealed = sealer.seal(str(uuid.uuid4()), plaintext)
    assert reader.open(sealed) == plaintext

    tampered = _tampered(sealed, field, position)
    assert tampered != sealed
    with pytest.raises(FIELDS[field]):
        opened = reader.open(tampered)
        pytest.fail(f"a flipped bit in {field} was not detected; open() returned {opened!r}")


# --- the validators ---------------------------------------------------------------------------

B64_ALPHABET = string.ascii_letters + string.digits + "+/"


def strict_base64(value: str) -> bool:
    """The oracle: non-empty ASCII that is the standard encoding of what it decodes to."""
    if not value or not value.isascii():
        return False
    try:
        decoded = base64.b64decode(value, validate=True)
    except binascii.Error:
        return False
    return base64.b64encode(decoded).decode("ascii") == value


def _mutate(value: str, data: st.DataObject, alphabet: str) -> str:
    """One insertion, deletion or replacement: the near misses a validator gets wrong."""
    if not value:
        return data.draw(st.text(alphabet=alphabet, max_size=2))
    position = data.draw(st.integers(0, len(value) - 1))
    char = data.draw(st.sampled_from(alphabet))
    edit = data.draw(st.sampled_from(["insert", "delete", "replace"]))
    if edit == "insert":
        return value[:position] + char + value[position:]
    if edit == "delete":
        return value[:position] + value[position + 1 :]
    return value[:position] + char + value[position + 1 :]


# Characters near the alphabet: padding, url-safe, whitespace, lookalikes, non-ASCII digits.
NEAR_B64 = B64_ALPHABET + "=-_ \t\r\n.\x00é\u0660\uff21"


@st.composite
def base64_candidates(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["valid", "near-miss", "random"]))
    if kind == "random":
        return draw(st.text(alphabet=NEAR_B64, max_size=24))
    valid = b64(draw(st.binary(max_size=18)))
    if kind == "valid":
        return valid
    return _mutate(valid, draw(st.data()), NEAR_B64)


@settings(max_examples=1000, deadline=None, database=None)
@given(value=base64_candidates())
def test_decode_secret_accepts_exactly_strict_canonical_base64(value: str) -> None:
    if strict_base64(value):
        assert decode_secret(value) == base64.b64decode(value)
    else:
        with pytest.raises(InvalidValue):
            decode_secret(value)


@settings(max_examples=300, deadline=None, database=None)
@given(value=st.text(max_size=12))
def test_decode_secret_on_arbitrary_text(value: str) -> None:
    if strict_base64(value):
        assert decode_secret(value) == base64.b64decode(value)
    else:
        with pytest.raises(InvalidValue):
            decode_secret(value)


HEX = "0123456789abcdefABCDEF"


def canonical_uuid(value: str) -> bool:
    """The oracle: 36 characters, hyphens at 8, 13, 18 and 23, ASCII hex digits elsewhere."""
    if len(value) != 36:
        return False
    return all(
        (char == "-") if index in (8, 13, 18, 23) else (char in HEX)
        for index, char in enumerate(value)
    )


# Lookalikes the regex must not take for hex digits: Arabic-Indic and full-width digits,
# a Unicode dash, braces, 'urn:uuid:' material, whitespace and a newline.
NEAR_UUID = HEX + "-gG\u0660\uff10\u2010{}urn: \n"


@st.composite
def uuid_candidates(draw: st.DrawFn) -> str:
    text = str(draw(st.uuids()))
    # Any mix of cases is allowed by the contract.
    text = "".join(c.upper() if draw(st.booleans()) else c for c in text)
    kind = draw(st.sampled_from(["valid", "near-miss", "wrapped", "random"]))
    if kind == "valid":
        return text
    if kind == "near-miss":
        return _mutate(text, draw(st.data()), NEAR_UUID)
    if kind == "wrapped":
        return draw(st.sampled_from(["{%s}", "urn:uuid:%s", " %s", "%s\n", "%s "])) % text
    return draw(st.text(alphabet=NEAR_UUID, min_size=30, max_size=40))


@settings(max_examples=1000, deadline=None, database=None)
@given(value=uuid_candidates())
def test_normalize_secret_id_accepts_exactly_canonical_uuids(value: str) -> None:
    if canonical_uuid(value):
        assert normalize_secret_id(value) == value.lower()
    else:
        with pytest.raises(InvalidValue):
            normalize_secret_id(value)


@settings(max_examples=300, deadline=None, database=None)
@given(value=st.uuids())
def test_hyphenless_uuids_are_refused(value: uuid.UUID) -> None:
    with pytest.raises(InvalidValue):
        normalize_secret_id(value.hex)
