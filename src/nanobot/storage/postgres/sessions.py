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

from nanobot.errors import LeaseLostError
from nanobot.health import StorageHealth
from nanobot.storage.base import ChatMessage, Lease, NewestTurns, SessionInfo, damaged_data, no_nul
from nanobot.storage.postgres.batches import Row, Statement, StatementGroups
from nanobot.storage.postgres.connect import storage_errors
from nanobot.storage.postgres.leases import CHANNEL
from nanobot.storage.sqlite import session_table
from nanobot.storage_config import StorageConfig

_COLUMNS = "key, title, created, updated, turns, preview"

# One round trip per turn: the fence (the lease row locked, so the lease cannot change hands
# before this commits), the turn, its session row (created, or moved forward) and, with $6, the
# lease given back with its waiters woken (NOTIFY, sent at commit, only when someone waited: see
# migrations._V3_leases). The new turn's id is the session's version; NULL when the fence
# refused the write.
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
    RETURNING session, waited
)
SELECT (SELECT id FROM turn) AS version,
       (SELECT count(pg_notify('{CHANNEL}', md5(session))) FROM gone WHERE waited) AS woken
"""


# The same for many turns at once (see batches.py), each fenced on its own: a row per session, its
# version NULL where its fence refused. Rows are locked in key order (as the grouped lease taking
# does), so two groups never wait on each other in a circle.
_APPEND_GROUPED = f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::int8[], $6::bool[])
        AS i(session, data, title, preview, token, release)
), fence AS (
    SELECT l.session FROM turn_leases AS l JOIN input AS i ON l.session = i.session AND l.token = i.token
    ORDER BY l.session FOR UPDATE OF l
), ok AS (
    SELECT i.* FROM input AS i WHERE i.token IS NULL OR i.session IN (SELECT session FROM fence)
), turn AS (
    INSERT INTO turns (session, data) SELECT session, data FROM ok ORDER BY session
    RETURNING id, session
), moved AS (
    INSERT INTO sessions AS s (key, title, created, updated, turns, preview)
    SELECT ok.session, ok.title, t.now, t.now, 1, ok.preview
    FROM ok, (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now) AS t ORDER BY ok.session
    ON CONFLICT (key) DO UPDATE
        SET updated = EXCLUDED.updated, turns = s.turns + 1, preview = EXCLUDED.preview
    RETURNING 1
), gone AS (
    DELETE FROM turn_leases AS l USING ok
    WHERE ok.release AND l.session = ok.session AND l.token = ok.token
    RETURNING l.session, l.waited
), woken AS (
    SELECT count(pg_notify('{CHANNEL}', md5(session))) AS n FROM gone WHERE waited
)
SELECT i.session, turn.id AS version, (SELECT n FROM woken) AS woken
FROM input AS i LEFT JOIN turn USING (session)
"""


class PgSessionBackend:
    """Session history on PostgreSQL: every process sees every turn, whichever process ran it."""

    def __init__(
        self, pool: asyncpg.Pool, config: StorageConfig, health: StorageHealth, groups: StatementGroups
    ) -> None:
        self._pool = pool
        self._groups = groups  # (the per-turn statement: writing the turn)
        self._url = config.url
        self._health = health  # flipped by each turn's write, for /health/ready
        self._write = Statement(
            "cannot save the conversation", _APPEND, _APPEND_GROUPED, self._written, health.failed
        )

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
        release = release and token is not None
        return self._groups.submit(self._write, key, data, no_nul(title), no_nul(preview), token, release)

    def _written(self, key: str, row: Row) -> int:
        """What a turn's write resolves to: the session's new version (called by the sender)."""
        self._health.succeeded()
        written: int | None = None if row is None else row["version"]
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
            row = await self._pool.fetchrow(sql, key, no_nul(title))
        return None if row is None else SessionInfo(*row)

    async def delete(self, key: str) -> bool:
        """Remove a session and its whole history; whether it existed."""
        with storage_errors("cannot delete a session", self._url):
            async with self._pool.acquire() as conn, conn.transaction():
                removed = await conn.execute("DELETE FROM sessions WHERE key = $1", key)
                turns = await conn.execute("DELETE FROM turns WHERE session = $1", key)
        return removed != "DELETE 0" or turns != "DELETE 0"

    async def close(self) -> None:
        """Nothing of its own to close: the writes under way are the statement groups', which
        :class:`PgStorage` finishes (as it closes the pool)."""
