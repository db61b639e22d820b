"""Strict validators for the two values clients send: a base64 secret and a secret id.

Strict means one spelling per value: standard alphabet, padding required, no whitespace,
and the canonical encoding (no stray bits in the last character), so a secret is stored
exactly as the bytes the client meant.
"""

from __future__ import annotations

import base64
import binascii
import re

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class InvalidValue(ValueError):
    """The value is malformed; the message says what is expected."""


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


def normalize_secret_id(value: str) -> str:
    """Accept a UUID in its canonical 8-4-4-4-12 hex form; return it in lower case."""
    if not _UUID.fullmatch(value):
        raise InvalidValue(
            "secret_id must be a UUID like 123e4567-e89b-42d3-a456-426614174000, "
            "as returned by /vault/secret/create"
        )
    return value.lower()
