"""Storage: sessions, turn leases, the outbox and inbound update ids, on SQLite or PostgreSQL.

Callers use the contracts in :mod:`nanobot.storage.base` and the :class:`Storage` bundle that
:func:`open_storage` returns for ``storage.url``: the embedded SQLite files under the workspace
(:mod:`nanobot.storage.sqlite`, one process) or a PostgreSQL database shared by any number of
processes (:mod:`nanobot.storage.postgres`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nanobot.config import Config
from nanobot.delivery.ownership import LaneOwnership, OneProcess
from nanobot.health import Readiness
from nanobot.storage.sessions import SessionStore

if TYPE_CHECKING:  # (the outbox module imports the SQLite writer from this package)
    from nanobot.storage.outbox import Outbox


async def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Storage:
    """Everything this process stores, opened together and closed together.

    ``outbox`` is opened and closed by its user (the delivery manager, which must stop its
    lanes first); ``ownership`` says which chat lanes this process delivers.
    """

    sessions: SessionStore
    outbox: Outbox
    ownership: LaneOwnership = field(default_factory=OneProcess)
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
    from nanobot.storage.sqlite.outbox import OutboxStore

    defaults = config.agents.defaults
    if not config.storage.is_postgres:
        sessions = await SessionStore.open(
            defaults.workspace_path,
            max_messages=defaults.max_history_messages,
            max_chars=defaults.max_history_chars,
            cache_bytes=defaults.session_cache_bytes,
            health=health.store("sessions"),
        )
        return Storage(sessions, OutboxStore(defaults.workspace_path / "outbox.db", health.store("outbox")))
    # Imported here: asyncpg is only loaded by deployments that use it.
    from nanobot.storage.postgres import PgOutbox, PgStorage

    pg = await PgStorage.open(config.storage, health.store("sessions"))
    shared = SessionStore(
        pg.sessions,
        pg.leases,
        max_messages=defaults.max_history_messages,
        max_chars=defaults.max_history_chars,
        cache_bytes=defaults.session_cache_bytes,
    )
    outbox = PgOutbox(pg.pool, config.storage, health.store("outbox"))
    return Storage(shared, outbox, outbox, pg.close)
