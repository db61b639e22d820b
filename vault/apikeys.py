"""API keys and bearer tokens as configured: their rules, their parsing, their digest.

``API_KEYS`` / ``API_KEYS_FILE`` hold ``name:token`` or ``name:token:scopes`` entries and
``METRICS_TOKEN`` one token. Settings parse them at start-up (vault/settings/); the
middleware that checks requests (middleware/apikeys.py) is handed the result, a
``KeyTable``: per key its name, tenant, scopes and the SHA-256 digest of its token, never
a token. Both sides hash with ``token_digest`` and name keys by ``KEY_NAME``, which the
middleware defines (it depends on nothing of the app) and this module uses.

``reload_key_file`` is what SIGHUP does (vault/app.py): read ``API_KEYS_FILE`` again and
put the new table in force, or keep the old one and say in one line why.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from middleware.apikeys import (
    DEFAULT_TENANT,
    KEY_NAME,
    SCOPES,
    APIKey,
    KeyTable,
    LiveKeys,
    token_digest,
)
from vault.errors import InvalidAPIKeys

__all__ = [
    "DEFAULT_TENANT",
    "KEY_NAME",
    "SCOPES",
    "APIKey",
    "InvalidAPIKeys",
    "KeyTable",
    "LiveKeys",
    "token_digest",
]

log = logging.getLogger("secret_manager.apikeys")

MIN_TOKEN_LENGTH = 32
KEY_FILE_VARIABLE = "API_KEYS_FILE"

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


_NAME_ADVICE = (
    "a key name is 1-64 characters of A-Z a-z 0-9 . _ - before the ':', "
    "after an optional tenant and '/' (acme/billing)"
)
_SCOPES_ADVICE = (
    f"scopes are {', '.join(SCOPES)}, joined by '+' after a second ':' "
    "(name:token:create+delete); leave out ':scopes' for all of them"
)


def _key_name(name: str, where: str) -> tuple[str, str]:
    """``tenant/name`` or ``name`` → (tenant, name); a bare name is the default tenant's."""
    tenant, slash, bare = name.rpartition("/")
    if not slash:
        tenant = DEFAULT_TENANT
    elif "/" in tenant:
        raise InvalidAPIKeys(
            f"{where}: a key name has at most one '/', between its tenant and its name"
        )
    elif not KEY_NAME.fullmatch(tenant):
        raise InvalidAPIKeys(
            f"{where}: a tenant is 1-64 characters of A-Z a-z 0-9 . _ - before the '/' "
            "of the key name"
        )
    if not KEY_NAME.fullmatch(bare):
        raise InvalidAPIKeys(f"{where}: {_NAME_ADVICE}")
    return tenant, bare


def _scopes(text: str | None, where: str) -> frozenset[str]:
    """The scopes after the second ``:``; every scope when there is no such part.

    An unknown one is named by its position only: whatever stands there may be a token
    written in the wrong place, which an error message must never repeat.
    """
    if text is None:
        return frozenset(SCOPES)
    if not text.strip():
        raise InvalidAPIKeys(
            f"{where}: the scopes after the second ':' are empty; {_SCOPES_ADVICE}"
        )
    parts = [part.strip() for part in text.split("+")]
    for number, part in enumerate(parts, start=1):
        if part not in SCOPES:
            which = "is empty" if not part else "is not a scope"
            raise InvalidAPIKeys(
                f"{where}: scope {number} of {len(parts)} after the second ':' {which}; "
                f"{_SCOPES_ADVICE}"
            )
    return frozenset(parts)


def parse_key_table(text: str, *, source: str) -> KeyTable:
    """``name:token`` / ``name:token:scopes`` entries → a KeyTable; raise InvalidAPIKeys
    naming ``source`` and the line (never a token).

    Entries are separated by newlines or commas (the file and the variable read alike);
    blank lines and lines starting with ``#`` are skipped. A name is 1-64 characters of
    ``A-Z a-z 0-9 . _ -``, optionally after a tenant of the same kind and a ``/``
    (``acme/billing``); without one it is the ``default`` tenant's (``default/billing`` is
    ``billing``). Names are unique within a tenant; tokens are unique and at least 32
    characters. Scopes are ``create``, ``fetch``, ``delete``, ``status`` joined by ``+``;
    an entry without them has every scope.
    """
    keys: list[APIKey] = []
    name_lines: dict[tuple[str, str], str] = {}
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
            parts = entry.split(":")
            if len(parts) == 1:
                raise InvalidAPIKeys(
                    f"{where}: expected name:token or name:token:scopes (no ':' found)"
                )
            if len(parts) > 3:
                raise InvalidAPIKeys(
                    f"{where}: expected name:token or name:token:scopes (more than two ':')"
                )
            name, token = parts[0].strip(), parts[1].strip()
            tenant, name = _key_name(name, where)
            _check_token(token, where)
            scopes = _scopes(parts[2] if len(parts) == 3 else None, where)
            if (tenant, name) in name_lines:
                in_tenant = "" if tenant == DEFAULT_TENANT else " in its tenant"
                raise InvalidAPIKeys(
                    f"{where}: the key name is already used{in_tenant} at "
                    f"{name_lines[tenant, name]}; give every key of a tenant its own name"
                )
            digest = token_digest(token)
            if digest in token_lines:
                raise InvalidAPIKeys(
                    f"{where}: the token is already used at {token_lines[digest]}; "
                    "give every key its own token"
                )
            keys.append(APIKey(name, digest, tenant, scopes))
            name_lines[tenant, name] = token_lines[digest] = where.removeprefix(f"{source} ")
    if not keys:
        raise InvalidAPIKeys(
            f"{source} holds no keys: add lines name:token, or unset {source} to turn API keys off"
        )
    return KeyTable(tuple(keys))


def parse_api_keys(text: str, *, source: str) -> dict[str, bytes]:
    """The token digest of each key by its label (``billing``, ``acme/billing``): the
    entries of ``parse_key_table`` without their scopes."""
    return parse_key_table(text, source=source).digests()


def read_key_file(path: Path) -> KeyTable:
    """``API_KEYS_FILE`` read and parsed as start-up does; InvalidAPIKeys naming the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidAPIKeys(
            f"{KEY_FILE_VARIABLE}={str(path)!r} cannot be read: {reason}"
        ) from None
    return parse_key_table(text.strip(), source=KEY_FILE_VARIABLE)


def _changes(old: KeyTable, new: KeyTable) -> str:
    before = {(key.tenant, key.name): key for key in old}
    after = {(key.tenant, key.name): key for key in new}
    added = len(after.keys() - before.keys())
    removed = len(before.keys() - after.keys())
    changed = sum(1 for name in after.keys() & before.keys() if after[name] != before[name])
    return f"{added} added, {removed} removed, {changed} changed"


def reload_key_file(live: LiveKeys, path: Path | None, *, quiet: bool = False) -> bool:
    """Re-read ``API_KEYS_FILE`` at ``path`` into ``live``, as SIGHUP asks; True if the
    table in force is now the file's.

    Logs one line: the number of keys now in force, or the problem (the parse error, which
    never holds a token) and that the previous keys stay, or why there is nothing to read
    (keys from ``API_KEYS``, or none). ``quiet``: say nothing when the file holds the keys
    already in force (a worker checking at start that it missed no SIGHUP).
    """
    pid = os.getpid()
    if path is None:
        if not quiet:
            if live.table:
                log.warning(
                    "SIGHUP: the API keys come from API_KEYS, which a running process cannot "
                    "re-read: nothing to re-read (process %d). To revoke a key without a "
                    "restart, give the keys in API_KEYS_FILE",
                    pid,
                )
            else:
                log.info("SIGHUP: API keys are off: nothing to re-read (process %d)", pid)
        return False
    try:
        table = read_key_file(path)
    except InvalidAPIKeys as exc:
        log.error(
            "%s not re-read, the %d keys in force stay (process %d): %s",
            KEY_FILE_VARIABLE,
            len(live.table),
            pid,
            exc,
        )
        return False
    previous = live.replace(table)
    if not quiet or previous != table:
        log.info(
            "%s re-read: %d keys in force (%s; process %d)",
            KEY_FILE_VARIABLE,
            len(table),
            _changes(previous, table),
            pid,
        )
    return True


def parse_token(text: str, *, source: str) -> bytes:
    """One bearer token (``METRICS_TOKEN``) → its SHA-256; InvalidAPIKeys naming ``source``."""
    _check_token(text.strip(), source)
    return token_digest(text.strip())
