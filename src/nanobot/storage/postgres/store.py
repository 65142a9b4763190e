"""One process's PostgreSQL storage: the pool, the schema, the implementations on them, and the
readiness probe.

The probe checks the server every ``storage.probeSeconds`` on a connection of its own (a busy pool
must not look like an unreachable server) and flips the store's readiness: ``/health/ready``
answers 503 while the database cannot be reached, and 200 again as soon as it can, whether or
not a request tried it meanwhile.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from nanobot.health import StorageHealth
from nanobot.storage.postgres.batches import StatementGroups
from nanobot.storage.postgres.connect import (
    DRIVER_ERRORS,
    create_pool,
    describe,
    reason,
    storage_errors,
)
from nanobot.storage.postgres.leases import PgTurnLeases
from nanobot.storage.postgres.migrations import migrate
from nanobot.storage.postgres.sessions import PgSessionBackend
from nanobot.storage_config import StorageConfig

log = logging.getLogger(__name__)


class PgStorage:
    """Opened once per process at start; every part shares its pool."""

    def __init__(
        self, pool: asyncpg.Pool, config: StorageConfig, schema_found: int, health: StorageHealth
    ) -> None:
        self.pool = pool
        self.schema_found = schema_found  # the version before this start's migrations (0: new)
        self.health = health
        # The two statements of every turn keep up to half the pool between turns (the rest is
        # for the outbox, listings and the like), grouped when those are all busy.
        self._groups = StatementGroups(pool, max(1, config.pool_size // 2), config.url)
        self.sessions = PgSessionBackend(pool, config, health, self._groups)
        self.leases = PgTurnLeases(pool, config, self._groups)
        self._config = config
        self._probe = asyncio.create_task(self._probing(), name="nanobot-storage-probe")

    @classmethod
    async def open(cls, config: StorageConfig, health: StorageHealth | None = None) -> PgStorage:
        """Connect, and migrate the schema (safe when many processes start at once); ``health``
        (for ``/health/ready``) is open from then on, failing while writes fail or the server
        cannot be reached.

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
        """Stop probing, finish the writes under way, stop listening, close the pool (safe to
        call twice)."""
        self._probe.cancel()
        await asyncio.wait([self._probe])  # (its CancelledError stays its own)
        await self.sessions.close()
        await self.leases.close()
        await self._groups.close()
        if not self.pool.is_closing():
            await self.pool.close()
        self.health.closed()

    async def _probing(self) -> None:
        """Check the server every ``probeSeconds``; say in the log when reachability changes."""
        conn: asyncpg.Connection | None = None
        reachable = True
        try:
            while True:
                await asyncio.sleep(self._config.probe_seconds)
                conn, cause = await self._probe_once(conn)
                self.health.probed(cause is None)
                if (cause is None) != reachable:
                    reachable = cause is None
                    if reachable:
                        log.info("storage: %s is reachable again", describe(self._config.url))
                    else:
                        log.warning("storage: %s is unreachable: %s", describe(self._config.url), cause)
        finally:
            if conn is not None:
                conn.terminate()

    async def _probe_once(
        self, conn: asyncpg.Connection | None
    ) -> tuple[asyncpg.Connection | None, str | None]:
        """One check: the connection to keep, and why the server could not be reached (None: it could)."""
        timeout = self._config.connect_timeout
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(self._config.url, timeout=timeout)
            await conn.fetchval("SELECT 1", timeout=timeout)
        except BaseException as exc:  # (cancelled at shutdown too: a new connection is not left open)
            if conn is not None:
                conn.terminate()
            if isinstance(exc, DRIVER_ERRORS):
                return None, reason(exc, self._config.url)
            raise
        return conn, None
