"""One process's PostgreSQL storage: the pool, the schema, and the implementations on them."""

from __future__ import annotations

import asyncpg

from nanobot.config import StorageConfig
from nanobot.health import StorageHealth
from nanobot.storage.postgres.connect import create_pool, storage_errors
from nanobot.storage.postgres.leases import PgTurnLeases
from nanobot.storage.postgres.migrations import migrate
from nanobot.storage.postgres.sessions import PgSessionBackend


class PgStorage:
    """Opened once per process at start; every part shares its pool."""

    def __init__(
        self, pool: asyncpg.Pool, config: StorageConfig, schema_found: int, health: StorageHealth
    ) -> None:
        self.pool = pool
        self.schema_found = schema_found  # the version before this start's migrations (0: new)
        self.health = health
        self.sessions = PgSessionBackend(pool, config, health)
        self.leases = PgTurnLeases(pool, config)

    @classmethod
    async def open(cls, config: StorageConfig, health: StorageHealth | None = None) -> PgStorage:
        """Connect, and migrate the schema (safe when many processes start at once); ``health``
        (for ``/health/ready``) is open from then on, and failing while writes fail.

        Raises StorageError naming the database (never its password) and the cause.
        """
        pool = await create_pool(config)
        try:
            with storage_errors("cannot migrate the schema", config.url):
                async with pool.acquire() as conn:
                    found = await migrate(conn)
        except BaseException:
            pool.terminate()
            raise
        health = health or StorageHealth("sessions")
        health.opened()
        return cls(pool, config, found, health)

    async def close(self) -> None:
        """Finish the writes under way, stop listening, close the pool (safe to call twice)."""
        await self.sessions.close()
        await self.leases.close()
        if not self.pool.is_closing():
            await self.pool.close()
        self.health.closed()
