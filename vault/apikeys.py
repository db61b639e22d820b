"""API keys and bearer tokens as configured: their rules, their parsing, their digest.

``API_KEYS`` / ``API_KEYS_FILE`` hold ``name:token`` entries and ``METRICS_TOKEN`` one token.
Settings parse them at start-up (vault/settings/); the middleware that checks requests
(middleware/apikeys.py) is handed the result: key names and the SHA-256 digest of each
token, never a token. Both sides hash with ``token_digest`` and name keys by ``KEY_NAME``,
which the middleware defines (it depends on nothing of the app) and this module uses.
"""

from __future__ import annotations

import re

from middleware.apikeys import KEY_NAME, token_digest
from vault.errors import InvalidAPIKeys

__all__ = ["KEY_NAME", "InvalidAPIKeys", "token_digest"]

MIN_TOKEN_LENGTH = 32

# RFC 6750's b64token: exactly what a client may put after "Bearer ". It excludes commas,
# colons and whitespace, so entries split unambiguously, and non-ASCII, so the bytes a
# client sends are the bytes hashed here.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_TOKEN_ADVICE = (
    f"a token is at least {MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / "
    "(then optionally =), for example from "
    "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
)


def _check_token(token: str, where: str) -> None:
    if not token:
        raise InvalidAPIKeys(f"{where}: the token is empty; {_TOKEN_ADVICE}")
    if len(token) < MIN_TOKEN_LENGTH:
        raise InvalidAPIKeys(
            f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} characters; {_TOKEN_ADVICE}"
        )
    if not _TOKEN.fullmatch(token):
        raise InvalidAPIKeys(
            f"{where}: the token has characters a Bearer header cannot carry; {_TOKEN_ADVICE}"
        )


def parse_api_keys(text: str, *, source: str) -> dict[str, bytes]:
    """``name:token`` entries → {name: SHA-256 of token}; raise InvalidAPIKeys naming ``source``.

    Entries are separated by newlines or commas (the file and the variable read alike);
    blank lines and lines starting with ``#`` are skipped. Names are 1-64 characters of
    ``A-Z a-z 0-9 . _ -`` and unique; tokens are unique and at least 32 characters.
    """
    keys: dict[str, bytes] = {}
    name_lines: dict[str, str] = {}
    token_lines: dict[bytes, str] = {}
    for line_number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if line.strip().startswith("#"):
            continue
        entries = [entry.strip() for entry in line.split(",")]
        for entry_number, entry in enumerate(entries, start=1):
            if not entry:
                continue
            where = f"{source} line {line_number}"
            if len(entries) > 1:
                where += f", entry {entry_number}"
            name, colon, token = (part.strip() for part in entry.partition(":"))
            if not colon:
                raise InvalidAPIKeys(f"{where}: expected name:token (no ':' found)")
            if not KEY_NAME.fullmatch(name):
                raise InvalidAPIKeys(
                    f"{where}: a key name is 1-64 characters of A-Z a-z 0-9 . _ - before the ':'"
                )
            _check_token(token, where)
            if name in name_lines:
                raise InvalidAPIKeys(
                    f"{where}: the key name is already used at {name_lines[name]}; "
                    "give every key its own name"
                )
            digest = token_digest(token)
            if digest in token_lines:
                raise InvalidAPIKeys(
                    f"{where}: the token is already used at {token_lines[digest]}; "
                    "give every key its own token"
                )
            keys[name] = digest
            name_lines[name] = token_lines[digest] = where.removeprefix(f"{source} ")
    if not keys:
        raise InvalidAPIKeys(
            f"{source} holds no keys: add lines name:token, or unset {source} to turn API keys off"
        )
    return keys


def parse_token(text: str, *, source: str) -> bytes:
    """One bearer token (``METRICS_TOKEN``) → its SHA-256; InvalidAPIKeys naming ``source``."""
    _check_token(text.strip(), source)
    return token_digest(text.strip())
