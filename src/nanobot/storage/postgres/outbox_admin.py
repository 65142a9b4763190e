"""``nanobot outbox list|retry|drop`` on PostgreSQL: one connection, one statement, then NOTIFY.

A change is committed together with its ``NOTIFY``, so every ``nanobot serve`` on the database
re-reads at once: the process holding the chat's lane sends a retried message now (a free lane
is claimed by whichever process comes first) and skips a dropped one. With none running, the
change takes effect at the next start.
"""

from __future__ import annotations

import time

import asyncpg

from nanobot.errors import StorageError
from nanobot.storage.outbox import OutboxEntry, State
from nanobot.storage.postgres import outbox_sql as sql
from nanobot.storage.postgres.connect import describe, reason, storage_errors
from nanobot.storage_config import StorageConfig

_LIST = f"""
SELECT {sql.COLUMNS} FROM outbox o WHERE $1::text[] IS NULL OR o.state = ANY($1::text[]) ORDER BY o.id
"""
_RETRY = """
UPDATE outbox SET state = 'pending', attempts = 0, next_at = $2, updated_at = $2, created_at = $2
WHERE id = $1 AND state IN ('failed', 'expired', 'held', 'pending')
RETURNING channel, chat_id
"""
_DROP = "DELETE FROM outbox WHERE id = $1 RETURNING id"


async def _connect(config: StorageConfig) -> asyncpg.Connection:
    try:
        conn: asyncpg.Connection = await asyncpg.connect(config.url, timeout=config.connect_timeout)
    except (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageError(f"cannot open {describe(config.url)}: {reason(exc, config.url)}") from None
    return conn


async def list_entries(config: StorageConfig, everything: bool) -> list[OutboxEntry]:
    """Every message not yet delivered (``everything``: those too), oldest first."""
    conn = await _connect(config)
    try:
        states = None if everything else [str(s) for s in State if s != State.DELIVERED]
        with storage_errors("cannot read the outbox", config.url):
            rows = await conn.fetch(_LIST, states)
    finally:
        await conn.close()
    return [OutboxEntry.from_row(tuple(r)) for r in rows]


async def change(config: StorageConfig, ident: int, retry: bool) -> bool:
    """Retry (pending again, fresh attempts) or drop message ``ident`` and tell every server;
    False when there is no such message (that can be retried)."""
    conn = await _connect(config)
    try:
        with storage_errors("cannot change the outbox", config.url):
            async with conn.transaction():
                if retry:
                    row = await conn.fetchrow(_RETRY, ident, time.time())
                    if row is not None:  # (a lane row for a message stored before it had one)
                        await conn.execute(sql.ENSURE_LANES, [row["channel"]], [row["chat_id"]])
                else:
                    row = await conn.fetchrow(_DROP, ident)
                if row is not None:
                    await conn.execute(sql.NOTIFY)
    finally:
        await conn.close()
    return row is not None
