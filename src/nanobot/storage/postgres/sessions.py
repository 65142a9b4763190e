"""The session contract (:class:`~nanobot.storage.base.SessionBackend`) on PostgreSQL.

Same rows as the SQLite side: ``turns`` (one row per turn, its messages as orjson bytes) and
``sessions`` (key, title, created, updated, turns, preview), kept in step by one statement per
turn. :meth:`PgSessionBackend.append` takes the turn's lease: the turn is written only while
that lease's token still holds the session (see :mod:`.leases`), checked in the same statement,
so a holder that stalled past its lease cannot write over a newer turn; and the same statement
gives the lease back (a turn's write is its last step under the lease): one round trip for both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import orjson

from nanobot.errors import LeaseLostError, StorageError
from nanobot.health import StorageHealth
from nanobot.storage.base import ChatMessage, Lease, NewestTurns, SessionInfo, damaged_data
from nanobot.storage.postgres.connect import QuickCheckout, storage_errors
from nanobot.storage.postgres.leases import CHANNEL
from nanobot.storage.sqlite import session_table
from nanobot.storage_config import StorageConfig

_COLUMNS = "key, title, created, updated, turns, preview"

# One round trip per turn: the fence (the lease row locked, so the lease cannot change hands
# before this commits), the turn, its session row (created, or moved forward) and, with $6, the
# lease given back with its waiters woken (NOTIFY is sent at commit). The new turn's id is the
# session's version; NULL when the fence refused the write.
_APPEND = f"""
WITH fence AS (
    SELECT 1 FROM turn_leases WHERE session = $1 AND token = $5 FOR UPDATE
), turn AS (
    INSERT INTO turns (session, data)
    SELECT $1, $2 WHERE $5::bigint IS NULL OR EXISTS (SELECT 1 FROM fence)
    RETURNING id, session
), moved AS (
    INSERT INTO sessions AS s (key, title, created, updated, turns, preview)
    SELECT session, $3, t.now, t.now, 1, $4
    FROM turn, (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now) AS t
    ON CONFLICT (key) DO UPDATE
        SET updated = EXCLUDED.updated, turns = s.turns + 1, preview = EXCLUDED.preview
    RETURNING 1
), gone AS (
    DELETE FROM turn_leases
    WHERE $6::boolean AND session = $1 AND token = $5 AND EXISTS (SELECT 1 FROM turn)
    RETURNING session
)
SELECT (SELECT id FROM turn) AS version,
       (SELECT count(pg_notify('{CHANNEL}', md5(session))) FROM gone) AS woken
"""


def _no_nul(text: str) -> str:
    # PostgreSQL text cannot hold NUL; titles and previews are display text, the turn keeps it.
    return text.replace("\x00", "") if "\x00" in text else text


class PgSessionBackend:
    """Session history on PostgreSQL: every process sees every turn, whichever process ran it."""

    def __init__(
        self, pool: asyncpg.Pool, config: StorageConfig, health: StorageHealth, quick: QuickCheckout
    ) -> None:
        self._pool = pool
        self._quick = quick  # (the per-turn statement: writing the turn)
        self._url = config.url
        self._health = health  # flipped by each turn's write, for /health/ready
        self._writes: set[asyncio.Future[int | None]] = set()

    async def keys(self) -> set[str]:
        """Every session key that has history."""
        with storage_errors("cannot read the sessions", self._url):
            rows = await self._pool.fetch("SELECT key FROM sessions")
        return {r[0] for r in rows}

    async def load(self, key: str, limit: int) -> list[ChatMessage]:
        """The last ``limit`` turns of ``key`` (so at least ``limit`` messages), oldest first."""
        sql = "SELECT data FROM turns WHERE session = $1 ORDER BY id DESC LIMIT $2"
        with storage_errors("cannot read a session", self._url):
            rows = await self._pool.fetch(sql, key, limit)
        with damaged_data():
            return [m for r in reversed(rows) for m in orjson.loads(r[0])]

    def append(
        self, key: str, messages: Sequence[ChatMessage], lease: Lease | None = None, *, release: bool = True
    ) -> asyncio.Future[int | None]:
        """Add one turn's messages to ``key``; the future resolves, once committed, to the
        session's new version.

        With ``lease``, only while it holds the session: else the future fails with
        :class:`LeaseLostError` and nothing is written; and (``release``) the lease is given back
        by the same statement. Serialises at once (a message that is not JSON raises here,
        before anything is under way).
        """
        data = orjson.dumps(messages)
        title, preview = session_table.summarize(messages)
        token = None if lease is None else lease.token
        write = asyncio.ensure_future(
            self._append(key, data, _no_nul(title), _no_nul(preview), token, release and token is not None)
        )
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        return write

    async def _append(
        self, key: str, data: bytes, title: str, preview: str, token: int | None, release: bool
    ) -> int | None:
        try:
            with storage_errors("cannot save the conversation", self._url):
                row = await self._quick.fetchrow(_APPEND, key, data, title, preview, token, release)
        except StorageError:
            self._health.failed()
            raise
        self._health.succeeded()
        assert row is not None  # (the statement always returns one row)
        written: int | None = row["version"]
        if written is None:
            raise LeaseLostError(
                f"the turn on session {key!r} was not saved: it ran past its lease and another "
                "turn took the session; send it again"
            )
        return written

    async def page(self, prefix: str, limit: int, after: str | None) -> tuple[list[SessionInfo], bool] | None:
        """See ``SessionBackend.page``: newest first, after the session ``after``."""
        sql = f"SELECT {_COLUMNS} FROM sessions WHERE key >= $1 AND key < $2"
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"
        args: list[object] = [prefix, end]
        with storage_errors("cannot list the sessions", self._url):
            async with self._pool.acquire() as conn:
                if after is not None:
                    cursor = await conn.fetchrow("SELECT updated FROM sessions WHERE key = $1", after)
                    if cursor is None or not after.startswith(prefix):
                        return None
                    sql += " AND (updated, key) < ($3, $4)"
                    args += [cursor["updated"], after]
                sql += f" ORDER BY updated DESC, key DESC LIMIT ${len(args) + 1}"
                rows = await conn.fetch(sql, *args, limit + 1)
        return [SessionInfo(*r) for r in rows[:limit]], len(rows) > limit

    async def read(
        self, key: str, max_messages: int, max_bytes: int
    ) -> tuple[SessionInfo, list[ChatMessage], bool] | None:
        """See ``SessionBackend.read``: the row and the newest whole turns, from one snapshot."""
        with storage_errors("cannot read a session", self._url), damaged_data():
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM sessions WHERE key = $1", key)
                if row is None:
                    return None
                newest = NewestTurns(max_messages, max_bytes)
                sql = "SELECT data FROM turns WHERE session = $1 ORDER BY id DESC"
                async for (data,) in conn.cursor(sql, key, prefetch=16):
                    if not newest.take(data):
                        break
        return SessionInfo(*row), newest.messages(), newest.truncated

    async def rename(self, key: str, title: str) -> SessionInfo | None:
        """Set an existing session's title; None when there is no such session."""
        sql = f"UPDATE sessions SET title = $2 WHERE key = $1 RETURNING {_COLUMNS}"
        with storage_errors("cannot rename a session", self._url):
            row = await self._pool.fetchrow(sql, key, _no_nul(title))
        return None if row is None else SessionInfo(*row)

    async def delete(self, key: str) -> bool:
        """Remove a session and its whole history; whether it existed."""
        with storage_errors("cannot delete a session", self._url):
            async with self._pool.acquire() as conn, conn.transaction():
                removed = await conn.execute("DELETE FROM sessions WHERE key = $1", key)
                turns = await conn.execute("DELETE FROM turns WHERE session = $1", key)
        return removed != "DELETE 0" or turns != "DELETE 0"

    async def close(self) -> None:
        """Wait for the writes under way (the pool itself belongs to :class:`PgStorage`)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
