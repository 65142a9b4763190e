"""Storage: sessions, turn leases, the outbox and inbound update ids, on SQLite or PostgreSQL.

Today the embedded SQLite implementations still live in :mod:`nanobot.sessions` and
:mod:`nanobot.delivery.outbox`; :mod:`nanobot.storage.postgres` implements the same contracts on a
PostgreSQL shared by any number of processes (``storage.url = postgresql://...``). The
restructuring of issue 9 moves the Protocols and the SQLite side in here, next to it.
"""

from __future__ import annotations

from nanobot.config import Config
from nanobot.health import StorageHealth
from nanobot.sessions import SessionStore


async def open_storage(config: Config, health: StorageHealth | None = None) -> SessionStore:
    """The session store ``storage.url`` names: the workspace's SQLite file (absent or
    ``"sqlite"``), or the shared PostgreSQL database (migrated at start). ``health`` is the
    store's readiness slot (``/health/ready``)."""
    defaults = config.agents.defaults
    if not config.storage.is_postgres:
        return await SessionStore.open(
            defaults.workspace_path,
            max_messages=defaults.max_history_messages,
            max_chars=defaults.max_history_chars,
            cache_bytes=defaults.session_cache_bytes,
            health=health,
        )
    # Imported here: asyncpg is only loaded by deployments that use it.
    from nanobot.storage.postgres import PgSessionStore, PgStorage

    storage = await PgStorage.open(config.storage, health)
    return PgSessionStore(
        storage,
        lease_seconds=config.storage.lease_seconds,
        max_messages=defaults.max_history_messages,
        max_chars=defaults.max_history_chars,
    )
