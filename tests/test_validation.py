"""vault/validation.py: exactly strict, canonical, standard base64 and canonical UUIDs."""

from __future__ import annotations

import base64
import os
import uuid

import pytest

from vault.errors import InvalidValue
from vault.validation import decode_secret, normalize_secret_id


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 31, 32, 33, 1000])
def test_standard_base64_of_any_bytes_decodes(size: int) -> None:
    data = os.urandom(size)
    assert decode_secret(base64.b64encode(data).decode()) == data


@pytest.mark.parametrize(
    "value",
    [
        "",  # empty secret
        "aGk",  # padding missing
        "aGk=\n",  # trailing newline
        "aGVs\nbG8=",  # embedded newline (MIME style)
        " aGk=",  # whitespace
        "aG k=",
        "-_-_",  # url-safe alphabet
        "aGk==",  # excess padding
        "aGk=aGk=",  # padding in the middle
        "aGl=",  # non-canonical: stray bits in the last character
        "YQ=a",
        "====",
        "aGk=\u00e9",
        "\u0430Gk=",  # Cyrillic 'a'
    ],
)
def test_anything_but_strict_canonical_base64_is_refused(value: str) -> None:
    with pytest.raises(InvalidValue):
        decode_secret(value)


def test_url_safe_characters_are_refused_even_when_they_decode() -> None:
    data = bytes([0xFB, 0xFF, 0xBF])  # standard: "+/+/", url-safe: "-_-_"
    assert decode_secret(base64.b64encode(data).decode()) == data
    with pytest.raises(InvalidValue):
        decode_secret(base64.urlsafe_b64encode(data).decode())


def test_uuid_in_canonical_form_is_accepted_and_lowered() -> None:
    value = str(uuid.uuid4())
    assert normalize_secret_id(value) == value
    assert normalize_secret_id(value.upper()) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not-a-uuid",
        uuid.uuid4().hex,  # no hyphens
        "{" + str(uuid.uuid4()) + "}",
        "urn:uuid:" + str(uuid.uuid4()),
        str(uuid.uuid4()) + "\n",
        str(uuid.uuid4())[:-1] + "g",
        "../" + str(uuid.uuid4())[3:],
    ],
)
def test_anything_but_a_canonical_uuid_is_refused(value: str) -> None:
    with pytest.raises(InvalidValue):
        normalize_secret_id(value)
