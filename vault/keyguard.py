"""The key guard: records sealed by a key the keyring does not hold, which nothing can open.

``serve`` and ``rewrap`` refuse to start while the store holds any (vault/cli/), unless
their key id is listed in RETIRED_KEY_IDS; a serving app keeps the count current for
``/readyz`` and the ``vault_records_unreadable`` gauge. Key ids are a PRF of the key
(vault/crypto.py ``key_id``): naming them reveals nothing about the keys.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from observability.metrics import RECORDS_UNREADABLE
from vault.stores.base import SecretStore

log = logging.getLogger("secret_manager.keyguard")

FIX = (
    "set MASTER_KEY_PREVIOUS to the key(s) that sealed them (comma-separated), or MASTER_KEY "
    "to the key this store was written with; to start anyway for a key retired on purpose, "
    "list its id in RETIRED_KEY_IDS"
)


def describe(counts: Mapping[str, int]) -> str:
    """``3 records sealed by key 1a2b..., 1 record by key 3c4d...``: largest first."""
    parts = []
    for position, (kid, count) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))):
        records = f"{count} record{'' if count == 1 else 's'}"
        parts.append(f"{records} {'sealed ' if position == 0 else ''}by key {kid}")
    return ", ".join(parts)


def refused(counts: Mapping[str, int], retired: Collection[str]) -> dict[str, int]:
    """The unknown key ids the guard refuses: every one not listed as retired."""
    return {kid: count for kid, count in counts.items() if kid not in retired}


def refusal(store_label: str, counts: Mapping[str, int], configured: Collection[str]) -> str:
    """The one line serve and rewrap stop with: what, how many, and the fix."""
    return (
        f"{store_label} holds records no configured key can open: {describe(counts)} "
        f"(configured key ids: {', '.join(configured) or 'none'}); {FIX}"
    )


def dev_refusal(key_path: str, store_label: str, counts: Mapping[str, int]) -> str:
    """The line ``serve --dev`` stops with when its key file is gone but records are not."""
    return (
        f"--dev found no key file {key_path!r} (DATA_DIR/master.key), but {store_label} holds "
        f"{describe(counts)}: restore that master.key from a backup (or set MASTER_KEY to "
        "the key that sealed them); to start afresh, point DATA_DIR at an empty directory. "
        "No new key was written"
    )


class UnreadableRecords:
    """The serving app's count of live records no configured key can open.

    ``count`` is None until the store has answered once. Refreshed at start and after each
    purge round, so a store that was down at start is counted once it answers; a change in
    which keys are missing is logged, naming their ids.

    Records sealed by a configured key that fail authentication (edited in the database:
    moved to another tenant, given another reader) are found only when read: a fetch that
    meets one reports it here (``failed_authentication``), by record key, and it counts
    until a fetch or delete of it finds it gone.
    """

    # Bounds the memory a flood of edited records could take; the count is then a floor.
    MAX_FAILED = 10_000

    def __init__(
        self, store: SecretStore, known_key_ids: Collection[str], retired: Collection[str]
    ) -> None:
        self._store = store
        self._known = frozenset(known_key_ids)
        self._retired = frozenset(retired)
        self._last: dict[str, int] | None = None
        self._unknown: int | None = None
        self._failed: set[str] = set()
        self.count: int | None = None

    def _publish(self) -> None:
        if self._unknown is None and not self._failed:
            return
        self.count = (self._unknown or 0) + len(self._failed)
        RECORDS_UNREADABLE.set(self.count)

    def failed_authentication(self, record_key: str) -> None:
        """A fetch met this record, sealed by a configured key, failing authentication."""
        if record_key not in self._failed and len(self._failed) < self.MAX_FAILED:
            log.warning("a stored record fails authentication: edited in the database?")
            self._failed.add(record_key)
            self._publish()

    def gone(self, record_key: str) -> None:
        """A fetch or delete found no record under ``record_key``, or removed it."""
        if record_key in self._failed:
            self._failed.discard(record_key)
            self._publish()

    async def refresh(self) -> None:
        """Count again; raises what the store raises (StoreUnavailable) and keeps the last."""
        counts = await self._store.unknown_key_counts(self._known)
        self._unknown = sum(counts.values())
        self._publish()
        if counts == self._last:
            return
        # A change of key ids is news; a change of counts alone (a record deleted) is not.
        if self._last is None or set(counts) != set(self._last):
            if counts:
                retired = sorted(set(counts) & self._retired)
                log.warning(
                    "%d records cannot be opened by any configured key: %s%s",
                    self._unknown,
                    describe(counts),
                    f" (retired on purpose: {', '.join(retired)})" if retired else "",
                )
            elif self._last:
                log.info("every live record opens with a configured key again")
        self._last = counts
