"""Storage: sessions, turn leases, the outbox and inbound update ids, on SQLite or PostgreSQL.

Callers use the contracts in :mod:`nanobot.storage.base` and the :class:`Storage` bundle that
:func:`open_storage` returns for ``storage.url``: the embedded SQLite files under the workspace
(:mod:`nanobot.storage.sqlite`, one process) or a PostgreSQL database shared by any number of
processes (:mod:`nanobot.storage.postgres`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nanobot.config import Config
from nanobot.health import Readiness
from nanobot.storage.sessions import SessionStore


async def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Storage:
    """Everything this process stores, opened together and closed together."""

    sessions: SessionStore
    # What the stores share, closed after them (the PostgreSQL pool; nothing for SQLite files).
    engine_close: Callable[[], Awaitable[None]] = _nothing

    async def close(self) -> None:
        """Finish the writes under way and close every store, then the engine."""
        try:
            await self.sessions.close()
        finally:
            await self.engine_close()


async def open_storage(config: Config, health: Readiness) -> Storage:
    """The stores ``storage.url`` names: the workspace's SQLite files (absent or ``"sqlite"``),
    or the shared PostgreSQL database (migrated at start). Each store flips its slot in
    ``health`` (``/health/ready``)."""
    defaults = config.agents.defaults
    if not config.storage.is_postgres:
        sessions = await SessionStore.open(
            defaults.workspace_path,
            max_messages=defaults.max_history_messages,
            max_chars=defaults.max_history_chars,
            cache_bytes=defaults.session_cache_bytes,
            health=health.store("sessions"),
        )
        return Storage(sessions)
    # Imported here: asyncpg is only loaded by deployments that use it.
    from nanobot.storage.postgres import PgStorage

    pg = await PgStorage.open(config.storage, health.store("sessions"))
    shared = SessionStore(
        pg.sessions,
        pg.leases,
        max_messages=defaults.max_history_messages,
        max_chars=defaults.max_history_chars,
        cache_bytes=defaults.session_cache_bytes,
    )
    return Storage(shared, pg.close)
