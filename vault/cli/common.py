"""What several commands share: the one-line refusal, and the checks before a store is used.

Start-up problems a user can fix end with one line naming the cause and exit status 2
(``EXIT_CONFIG``), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Collection

from vault.backend import backend_for
from vault.errors import ConfigError
from vault.keyguard import describe, refusal, refused
from vault.settings import Settings

log = logging.getLogger("secret_manager.cli")

EXIT_CONFIG = 2


def fail(message: str) -> int:
    """Print the one-line refusal on standard error; the exit status to return with it."""
    print(f"secret-manager: {message}", file=sys.stderr)
    return EXIT_CONFIG


def positive(value: str) -> int:
    """An argparse type: a whole number, at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def unknown_key_counts(settings: Settings, known_key_ids: Collection[str]) -> dict[str, int]:
    """Open the configured store briefly and ask it which key ids, not in ``known_key_ids``,
    seal live records, and how many each (through the key id index). An SQLite file that
    does not exist yet holds none, and is not created here. Raises what the store raises
    when it cannot answer (StoreUnavailable), within the store's own timeouts."""
    backend = backend_for(settings)
    if not backend.exists():
        return {}

    async def ask() -> dict[str, int]:
        store = backend.open()
        await store.open()
        try:
            return await store.unknown_key_counts(known_key_ids)
        finally:
            await store.close()

    return asyncio.run(ask())


def guard_keys(
    settings: Settings, configured: Collection[str], *, on_unchecked: Callable[[str], None]
) -> None:
    """The key guard before serve or rewrap starts: ConfigError, one line naming the key
    ids no configured key matches and the records each seals, unless every such id is in
    RETIRED_KEY_IDS. A store that cannot answer is left to ``on_unchecked``."""
    try:
        counts = unknown_key_counts(settings, configured)
    except Exception as exc:  # down, refusing credentials, an unreadable file: not ours to judge
        on_unchecked(type(exc).__name__)
        return
    blocking = refused(counts, settings.retired_key_ids)
    if blocking:
        raise ConfigError(refusal(backend_for(settings).label, blocking, configured))
    if counts:
        log.warning(
            "starting although %s (RETIRED_KEY_IDS): no configured key opens them; a fetch "
            "of one answers 500",
            describe(counts),
        )
