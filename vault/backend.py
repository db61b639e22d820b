"""Which store the settings configure: the one place the choice is made.

Everything that opens a store (the app, export and import, rewrap, the key guard) asks
``backend_for(settings)`` and then talks to the ``Backend`` it returns (label, check,
exists, open, open_bulk), never to the settings' MONGO_URI or DATA_DIR itself.
"""

from __future__ import annotations

from vault.settings import Settings
from vault.stores.base import Backend


def backend_for(settings: Settings) -> Backend:
    """MongoDB when MONGO_URI is set, else the SQLite file under DATA_DIR."""
    if settings.mongo_uri:
        from vault.stores.mongo import MongoBackend  # pymongo only when it is the store

        return MongoBackend(
            settings.mongo_uri,
            settings.mongo_db,
            write_concern=settings.mongo_write_concern,
            journal=settings.mongo_journal,
            pool_size=settings.mongo_pool_size,
            timeout=settings.store_timeout_seconds,
            max_secret_bytes=settings.max_secret_bytes,
            events=settings.emitted_events,
        )
    from vault.stores.sqlite import SQLiteBackend

    return SQLiteBackend(
        settings.data_dir,
        timeout=settings.store_timeout_seconds,
        max_secret_bytes=settings.max_secret_bytes,
        events=settings.emitted_events,
    )
