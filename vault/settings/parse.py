"""Parsers, one per kind of value a setting holds.

Each takes the text and the name of the variable it came from (NAME, or NAME_FILE for a
secret read from a file) and returns the typed value, or raises a ConfigError that names
that variable and says what is wanted. Secret values are never quoted.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import TypeVar

from vault.apikeys import KeyTable, parse_key_table, parse_token
from vault.crypto import parse_key
from vault.errors import ConfigError, InvalidAPIKeys, MalformedKey
from vault.events import EVENT_TYPES
from vault.settings.variables import Parser


def text(value: str, name: str) -> str:
    return value.strip()


def verbatim(value: str, name: str) -> str:
    return value


def path(value: str, name: str) -> Path:
    return Path(value)


def whole(minimum: int) -> Parser[int]:
    def parse(value: str, name: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
        if number < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {number}")
        return number

    return parse


def seconds(minimum: float) -> Parser[float]:
    def parse(value: str, name: str) -> float:
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
        if not number >= minimum:  # also rejects nan
            raise ConfigError(f"{name} must be at least {minimum}, got {value!r}")
        return number

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def boolean(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


E = TypeVar("E", bound=StrEnum)


def choice(kind: type[E]) -> Parser[E]:
    """One of an enum's values, in any case."""

    def parse(value: str, name: str) -> E:
        wanted = value.strip().lower()
        for member in kind:
            if member.value.lower() == wanted:
                return member
        allowed = ", ".join(member.value for member in kind)
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")

    return parse


def key(value: str, name: str) -> bytes:
    try:
        return parse_key(value)
    except MalformedKey as exc:
        raise ConfigError(f"{name} is malformed: {exc}") from None


def keys(value: str, name: str) -> tuple[bytes, ...]:
    """Keys separated by commas or newlines."""
    return tuple(
        key(part.strip(), name) for part in value.replace("\n", ",").split(",") if part.strip()
    )


_KEY_ID = re.compile(r"[0-9a-f]{16}")


def key_ids(value: str, name: str) -> tuple[str, ...]:
    """Key ids as the key guard and rewrap print them, comma-separated."""
    ids = [part.strip().lower() for part in value.replace("\n", ",").split(",") if part.strip()]
    for kid in ids:
        if not _KEY_ID.fullmatch(kid):
            raise ConfigError(
                f"{name} must be comma-separated key ids of 16 hex digits, as the "
                f"start-up refusal and rewrap print them; got {kid[:40]!r}"
            )
    return tuple(dict.fromkeys(ids))


def database_name(value: str, name: str) -> str:
    raw = value.strip()
    if not raw or any(c in raw for c in '/\\. "$\x00') or len(raw) > 63:
        raise ConfigError(
            f"{name} must be a MongoDB database name (1-63 characters, no '/\\. \"$'), got {raw!r}"
        )
    return raw


def write_concern(value: str, name: str) -> str | int:
    raw = value.strip()
    if raw == "majority":
        return raw
    try:
        number = int(raw)
    except ValueError:
        raise ConfigError(
            f"{name} must be 'majority' or a number of nodes, got {value!r}"
        ) from None
    if number < 1:
        raise ConfigError(f"{name} must be at least 1: an unacknowledged write could be lost")
    return number


def api_keys(value: str, name: str) -> KeyTable:
    """Each key's name, tenant, scopes and SHA-256 of its token; the tokens are not kept."""
    try:
        return parse_key_table(value.strip(), source=name)
    except InvalidAPIKeys as exc:
        raise ConfigError(str(exc)) from None


def token_digest(value: str, name: str) -> bytes:
    try:
        return parse_token(value, source=name)
    except InvalidAPIKeys as exc:
        raise ConfigError(str(exc)) from None


def bearer_token(value: str, name: str) -> str:
    """A token a Bearer header can carry, checked without ever being quoted."""
    token_digest(value, name)
    return value.strip()


def hmac_key(value: str, name: str) -> bytes:
    text = value.strip()
    if len(text.encode("utf-8")) < 32:
        raise ConfigError(f"{name} must be at least 32 characters (try `secret-manager genkey`)")
    return text.encode("utf-8")


_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def rate_limits(value: str, name: str) -> tuple[tuple[int, int], ...]:
    """``100/second;2000/minute`` → ((100, 1), (2000, 60)); ``off`` → ()."""
    if value.strip().lower() == "off":
        return ()
    limits: list[tuple[int, int]] = []
    for part in value.split(";"):
        count, _, unit = part.strip().partition("/")
        unit = unit.strip().lower().removesuffix("s")
        if not count.strip().isdigit() or int(count) < 1 or unit not in _PERIODS:
            raise ConfigError(
                f"{name} must look like '50/second' or '100/second;2000/minute' "
                f"(units: second, minute, hour, day) or 'off', got {value!r}"
            )
        if any(period == _PERIODS[unit] for _, period in limits):
            # Both would count under one key, so each request would count twice. The rate
            # limiter refuses such a pair too, but only when Starlette builds the stack on
            # the first request, which then answers 500 to every call.
            raise ConfigError(
                f"{name} names the period {unit!r} twice ({value!r}): keep one limit per "
                "period, the smaller"
            )
        limits.append((int(count), _PERIODS[unit]))
    return tuple(limits)


def networks(value: str, name: str) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for part in value.replace(";", ",").split(","):
        if not part.strip():
            continue
        try:
            networks.append(ip_network(part.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{name} must be comma-separated addresses or CIDRs like 10.0.0.0/8, "
                f"got {part.strip()!r}"
            ) from None
    return tuple(networks)


def _entries(value: str) -> list[str]:
    """Comma- or newline-separated entries, blank ones left out."""
    return [part.strip() for part in value.replace("\n", ",").split(",") if part.strip()]


def webhook_urls(value: str, name: str) -> tuple[str, ...]:
    """http:// or https:// URLs, each once. An entry is named by its position, never
    quoted: a receiver's URL may carry a token."""
    urls: list[str] = []
    for number, url in enumerate(_entries(value), start=1):
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is no number
        except ValueError:
            parts = None
        if (
            parts is None
            or parts.scheme.lower() not in ("http", "https")
            or not parts.hostname
            or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url)
        ):
            raise ConfigError(
                f"{name}: entry {number} is not an http:// or https:// URL with a host"
            )
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"{name}: entry {number} carries a user or password, which is not sent: "
                "put the receiver's token in its path or query instead"
            )
        urls.append(url)
    return tuple(dict.fromkeys(urls))


WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - the form's prefix, not a secret


def webhook_secret(value: str, name: str) -> bytes:
    """A Standard Webhooks signing secret: ``whsec_`` and the base64 of 24 to 64 bytes; the
    bytes (the HMAC key) are returned."""
    text = value.strip()
    how = (
        "generate one with: python3 -c 'import base64, secrets; "
        'print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())\''
    )
    if not text.startswith(WEBHOOK_SECRET_PREFIX):
        raise ConfigError(f"{name} must be whsec_ followed by base64 ({how})")
    encoded = text.removeprefix(WEBHOOK_SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{name} is not whsec_ followed by base64 ({how})") from None
    if not 24 <= len(key) <= 64:
        raise ConfigError(f"{name} must hold 24 to 64 bytes once decoded ({how})")
    return key


ALL_EVENTS = "all"


def event_types(value: str, name: str) -> tuple[str, ...]:
    """``all``, or lifecycle event types (vault/events.py), comma-separated."""
    if value.strip().lower() == ALL_EVENTS:
        return EVENT_TYPES
    chosen = _entries(value)
    for kind in chosen:
        if kind not in EVENT_TYPES:
            raise ConfigError(
                f"{name} names {kind[:40]!r}, which is no event type: use {ALL_EVENTS} or "
                f"some of {', '.join(EVENT_TYPES)}"
            )
    return tuple(kind for kind in EVENT_TYPES if kind in chosen)
