"""Strict validators for the values clients send: a base64 secret, a secret id, readers.

Strict means one spelling per value: standard alphabet, padding required, no whitespace,
and the canonical encoding (no stray bits in the last character), so a secret is stored
exactly as the bytes the client meant.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from typing import Any

from vault.errors import InvalidValue

# The rules as patterns, for the OpenAPI document (vault/openapi.py) to state what is checked
# here. A secret id is checked with this very pattern.
UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# Exactly what decode_secret accepts: canonical standard base64 of at least one byte (the bits
# a padded last group leaves unused must be zero, so "ab==" is refused and "aQ==" is not).
# decode_secret checks it step by step instead, to say which rule a value broke, and in a
# tenth of the time on a 64 KiB secret; tests/test_openapi.py holds the two to one answer.
BASE64_PATTERN = (
    "^(?:[A-Za-z0-9+/]{4})*"
    "(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$"
)

_UUID = re.compile(UUID_PATTERN)
# A key name as an API key file spells it after its tenant prefix (vault/apikeys.py).
KEY_NAME_PATTERN = "^[A-Za-z0-9._-]{1,64}$"
_KEY_NAME = re.compile(KEY_NAME_PATTERN)
MAX_READERS = 100


def decode_secret(value: str) -> bytes:
    """Decode strict, canonical, standard base64; raise InvalidValue otherwise."""
    if not value:
        raise InvalidValue("secret is empty: send at least one byte, base64-encoded")
    if not value.isascii():
        raise InvalidValue("secret must be standard base64 (A-Z a-z 0-9 + /, '=' padding)")
    if len(value) % 4:
        raise InvalidValue(
            "secret must be standard base64 with '=' padding: its length must be a multiple of 4"
        )
    try:
        decoded = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise InvalidValue(
            "secret must be standard base64 (A-Z a-z 0-9 + /, '=' padding, "
            "no whitespace, newlines or url-safe '-' '_')"
        ) from None
    if base64.b64encode(decoded).decode("ascii") != value:
        raise InvalidValue(
            "secret is not canonical base64: encode the bytes with a standard base64 encoder"
        )
    return decoded


def normalize_secret_id(value: str, name: str = "secret_id") -> str:
    """Accept a UUID in its canonical 8-4-4-4-12 hex form; return it in lower case.
    ``name`` is the field's (``receipt_id`` is checked alike)."""
    if not _UUID.fullmatch(value):
        raise InvalidValue(
            f"{name} must be a UUID like 123e4567-e89b-42d3-a456-426614174000, "
            "as returned by /vault/secret/create"
        )
    return value.lower()


MAX_LABEL = 200
# Printable text: no control characters (C0, DEL, C1) and no line or paragraph separators,
# so a label is one line wherever it is shown. The OpenAPI document states this pattern.
LABEL_PATTERN = f"^[^\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]{{1,{MAX_LABEL}}}$"
_LABEL = re.compile(LABEL_PATTERN)


def label_text(value: Any) -> str:
    """A create's ``label``: 1 to MAX_LABEL printable characters; InvalidValue otherwise."""
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise InvalidValue(
            f"field 'label' must be a string of 1 to {MAX_LABEL} printable characters "
            "(no control characters or line breaks), or left out"
        )
    return value


MAX_PASSPHRASE = 1024


def passphrase_text(value: Any) -> str:
    """A create's or fetch's ``passphrase``: a string of 1 to MAX_PASSPHRASE characters, in
    Unicode normalization form NFC (so the same words typed on two systems match);
    InvalidValue otherwise, whose message never quotes it."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_PASSPHRASE:
        raise InvalidValue(
            f"field 'passphrase' must be a string of 1 to {MAX_PASSPHRASE} characters, or left out"
        )
    return unicodedata.normalize("NFC", value)


def reader_names(value: Any) -> tuple[str, ...]:
    """A create's ``readers``: a JSON array of 1 to MAX_READERS distinct key names (without
    a tenant prefix), as given; raise InvalidValue otherwise."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_READERS:
        raise InvalidValue(
            f"field 'readers' must be a JSON array of 1 to {MAX_READERS} API key names, or left out"
        )
    for name in value:
        if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
            shown = repr(name)[:70] if isinstance(name, str) else "a non-string"
            raise InvalidValue(
                f"field 'readers' holds {shown}: a reader is an API key name of 1-64 characters "
                "of A-Z a-z 0-9 . _ - (without its tenant prefix)"
            )
    duplicates = sorted({name for name in value if value.count(name) > 1})
    if duplicates:
        raise InvalidValue(f"field 'readers' names {duplicates[0]!r} twice: name each reader once")
    return tuple(value)
