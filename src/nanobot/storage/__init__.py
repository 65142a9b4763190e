"""Storage: sessions, turn leases, the outbox and inbound update ids, on SQLite or PostgreSQL.

Today the embedded SQLite implementations still live in :mod:`nanobot.sessions` and
:mod:`nanobot.delivery.outbox`; :mod:`nanobot.storage.postgres` implements the same contracts on a
PostgreSQL shared by any number of processes (``storage.url = postgresql://...``). The
restructuring of issue 9 moves the Protocols and the SQLite side in here, next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanobot.config import Config
from nanobot.delivery.outbox import Outbox, OutboxStore
from nanobot.delivery.ownership import LaneOwnership, OneProcess
from nanobot.health import StorageHealth
from nanobot.sessions import SessionStore


@dataclass(frozen=True, slots=True)
class Storage:
    """What ``storage.url`` opened: the sessions, and the outbox with its lanes' ownership."""

    sessions: SessionStore
    outbox: Outbox
    ownership: LaneOwnership


async def open_storage(
    config: Config, health: StorageHealth | None = None, outbox_health: StorageHealth | None = None
) -> Storage:
    """The stores ``storage.url`` names: the workspace's SQLite files (absent or ``"sqlite"``),
    or the shared PostgreSQL database (migrated at start). ``health`` and ``outbox_health`` are
    the readiness slots (``/health/ready``). The SQLite outbox is opened by its user."""
    defaults = config.agents.defaults
    if not config.storage.is_postgres:
        sessions = await SessionStore.open(
            defaults.workspace_path,
            max_messages=defaults.max_history_messages,
            max_chars=defaults.max_history_chars,
            cache_bytes=defaults.session_cache_bytes,
            health=health,
        )
        outbox = OutboxStore(defaults.workspace_path / "outbox.db", outbox_health)
        return Storage(sessions, outbox, OneProcess())
    # Imported here: asyncpg is only loaded by deployments that use it.
    from nanobot.storage.postgres import PgOutbox, PgSessionStore, PgStorage

    storage = await PgStorage.open(config.storage, health)
    sessions = PgSessionStore(
        storage,
        lease_seconds=config.storage.lease_seconds,
        max_messages=defaults.max_history_messages,
        max_chars=defaults.max_history_chars,
    )
    shared = PgOutbox(storage.pool, config.storage, outbox_health)
    return Storage(sessions, shared, shared)
