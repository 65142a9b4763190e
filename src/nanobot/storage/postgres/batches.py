"""The per-turn statements on PostgreSQL, grouped: one round trip and one commit for every turn
waiting at that moment (group commit, as the SQLite writer does).

A turn costs two statements: taking its session's lease, and writing the turn (which also gives
the lease back). Each goes out at once on a connection kept between turns while fewer than
``limit`` are busy; when all are, statements of one kind queue, and the next connection to come
free sends every queued one of that kind as a single statement over arrays. PostgreSQL's cost
per statement (parse, bind, the transaction and its commit, the socket on both sides) is then
shared: with 16 turns at a time in one process (``python -m bench.pg_turns``) the database's
CPU per turn fell from 332 to 70 µs and the gateway's from 260 to 83 µs (README, "Running several
processes"). An idle gateway is as quick as before: a lone statement goes out alone, in its
single-row form.

A group holds one statement per session key (a second waits for the next group), and every
statement of a group succeeds or fails on its own: a group the server refuses as a whole is
sent again one statement at a time, so one bad row never costs another turn its answer. A
statement taken from the queue runs whether or not anyone still waits for it (a turn whose
client left is written whole, as on SQLite); its result is simply not delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from nanobot.errors import StorageError
from nanobot.storage.postgres.connect import DRIVER_ERRORS, describe, reason

MAX_GROUP = 64  # statements per group: bounds one statement's arrays and the locks it holds
# What one row of a group can cause (bad data, a constraint, a lock cycle): the group is worth
# resending statement by statement. Anything else (the server going away, out of resources)
# would fail each of them again, one timeout after another: the whole group fails at once.
_ROW_FAULTS = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.CardinalityViolationError,
    asyncpg.exceptions.TransactionRollbackError,
)

Row = asyncpg.Record | None


class Statement:
    """One kind of per-turn statement: its single-row SQL, its grouped SQL over arrays, and what
    its caller gets from a session key's row (``finish`` may raise; the row is None when the
    group returned none for that key)."""

    __slots__ = ("doing", "failed", "finish", "grouped", "single")

    def __init__(
        self,
        doing: str,
        single: str,
        grouped: str,
        finish: Callable[[str, Row], Any],
        failed: Callable[[], None] | None = None,
    ) -> None:
        self.doing = doing  # for errors: "cannot take a session lease"
        self.single = single  # $1 is the session key
        self.grouped = grouped  # one array per parameter; returns rows with a "session" column
        self.finish = finish
        self.failed = failed  # told when the statement could not be run (readiness)


class _Queued:
    __slots__ = ("args", "future", "key")

    def __init__(self, key: str, args: tuple[object, ...], future: asyncio.Future[Any]) -> None:
        self.key = key
        self.args = args
        self.future = future


class StatementGroups:
    """Sends the per-turn statements on up to ``limit`` connections borrowed from the pool and
    kept between turns (``Pool.fetchrow`` costs ~30 µs of Python per call in acquire and release
    alone); what arrives while they are all busy goes out grouped (see the module's text)."""

    def __init__(self, pool: asyncpg.Pool, limit: int, url: str) -> None:
        self._pool = pool
        self._limit = limit
        self._url = url
        self._idle: list[PoolConnectionProxy] = []
        self._queues: dict[Statement, deque[_Queued]] = {}
        self._senders = 0  # tasks sending (each on one connection): at most ``limit``
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, statement: Statement, key: str, *args: object) -> asyncio.Future[Any]:
        """Queue one statement (``args`` after the key); its future resolves to
        ``statement.finish(row)``, or fails with that exception or a StorageError saying what failed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        queue = self._queues.get(statement)
        if queue is None:
            queue = self._queues[statement] = deque()
        queue.append(_Queued(key, (key, *args), future))
        if self._senders < self._limit:
            self._senders += 1
            task = loop.create_task(self._send(), name="nanobot-storage-send")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return future

    def _next(self) -> tuple[Statement, list[_Queued]] | None:
        """The longest queue's statements, one per key, oldest first (None: nothing queued)."""
        statement, queue = max(self._queues.items(), key=lambda kv: len(kv[1]), default=(None, None))
        if statement is None or not queue:
            return None
        group = [queue.popleft()]
        if queue:
            keys = {group[0].key}
            kept: list[_Queued] = []
            while queue and len(group) < MAX_GROUP:
                item = queue.popleft()
                if item.key in keys:
                    kept.append(item)  # (its own key's previous statement goes first)
                else:
                    keys.add(item.key)
                    group.append(item)
            queue.extendleft(reversed(kept))
        return statement, group

    async def _send(self) -> None:
        conn: PoolConnectionProxy | None = None
        try:
            while (work := self._next()) is not None:
                statement, group = work
                if conn is None:
                    conn = self._idle.pop() if self._idle else await self._borrow(statement, group)
                    if conn is None:
                        continue
                conn = await self._run(conn, statement, group)
        finally:
            self._senders -= 1
            if conn is not None:
                self._idle.append(conn)

    async def _borrow(self, statement: Statement, group: Sequence[_Queued]) -> PoolConnectionProxy | None:
        """A connection from the pool; None when there is none to be had (the group has failed)."""
        try:
            conn: PoolConnectionProxy = await self._pool.acquire()
        except Exception as exc:
            self._fail(statement, group, exc)
            return None
        return conn

    async def _run(
        self, conn: PoolConnectionProxy, statement: Statement, group: Sequence[_Queued]
    ) -> PoolConnectionProxy | None:
        """Send one group and settle its futures; the connection, or None when it went back to
        the pool after failing (the pool resets or replaces it)."""
        try:
            if len(group) == 1:
                rows = {group[0].key: await conn.fetchrow(statement.single, *group[0].args)}
            else:
                columns = [list(column) for column in zip(*(item.args for item in group), strict=True)]
                rows = {row["session"]: row for row in await conn.fetch(statement.grouped, *columns)}
        except asyncio.CancelledError:  # (the loop is closing)
            await self._pool.release(conn)
            for item in group:
                item.future.cancel()
            raise
        except Exception as exc:
            await self._pool.release(conn)
            if len(group) > 1 and isinstance(exc, _ROW_FAULTS):  # one row's fault?
                for item in group:  # (each on its own: only a bad one fails)
                    single = await self._borrow(statement, [item])
                    if single is not None and (single := await self._run(single, statement, [item])):
                        await self._pool.release(single)
            else:
                self._fail(statement, group, exc)
            return None
        for item in group:
            if item.future.done():  # (nobody waits any more: the statement ran all the same)
                continue
            try:
                item.future.set_result(statement.finish(item.key, rows.get(item.key)))
            except Exception as exc:
                item.future.set_exception(exc)
        return conn

    def _fail(self, statement: Statement, group: Sequence[_Queued], exc: Exception) -> None:
        """Fail every statement of ``group``: a driver's error as a StorageError saying what
        failed (a fresh one each), anything else (a bug) as itself."""
        if statement.failed is not None:
            statement.failed()
        for item in group:
            if item.future.done():
                continue
            if isinstance(exc, DRIVER_ERRORS):
                why = f"{statement.doing} (PostgreSQL {describe(self._url)}): {reason(exc, self._url)}"
                item.future.set_exception(StorageError(why))
            else:
                item.future.set_exception(exc)

    async def close(self) -> None:
        """Wait for what is being sent; give the kept connections back (before the pool closes:
        it waits for them)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(*DRIVER_ERRORS):
                await self._pool.release(conn)
