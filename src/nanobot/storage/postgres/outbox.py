"""The outbox on PostgreSQL: any process enqueues; each chat's lane is delivered by one at a time.

A *lane* (one chat) is a row of ``outbox_lanes``. A process claims free lanes that have pending
messages with ``FOR UPDATE SKIP LOCKED`` (on lanes, not messages: order per chat holds, and
chats spread over processes), for ``storage.leaseSeconds``, with a fencing token from one
sequence. While it holds a lane it renews the lease; the results of its delivery attempts are
written only while the token is still the lane's. A process that dies mid-delivery stops
renewing: its lanes are claimed by another once the lease ends, and only the message that was
under way can be sent twice. Idle lanes are given back; a clean stop gives back every lane.

Waking: every change (new messages, ``nanobot outbox retry|drop``, lanes given back) sends a
``NOTIFY``; each process listens on one connection and re-reads at once. Besides, each process
sleeps until the soonest lease of another process's lane with work ends (a crashed holder
announces nothing), and re-reads every ``leaseSeconds`` in case a notification was lost.

Rate limits: a platform's ``Retry-After`` seen by one process is stored in ``outbox_holds`` and
announced; every process holds that channel until it ends.

Text: PostgreSQL ``text`` cannot hold U+0000; it is dropped from what is stored (the manager
drops it before, on every backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from nanobot.errors import StorageError
from nanobot.health import StorageHealth
from nanobot.storage.base import no_nul
from nanobot.storage.outbox import DELIVERED_KEEP_SECONDS, NewMessage, OutboxEntry, State
from nanobot.storage.postgres import outbox_sql as sql
from nanobot.storage.postgres.connect import DRIVER_ERRORS, listening, reason, storage_errors
from nanobot.storage_config import StorageConfig

log = logging.getLogger(__name__)

Lane = tuple[str, str]
# Our leases are judged from when the claim or renewal was *sent*, and end a little early here:
# the database's lease (from when it ran the statement) always outlasts what we believe.
_MARGIN = 0.9
_CLAIM_BATCH = 256  # lanes claimed per statement; more are claimed by the next re-read
_WAITING = [str(s) for s in (State.PENDING, State.HELD, State.FAILED, State.EXPIRED)]


class PgOutbox:
    """The :class:`~nanobot.storage.outbox.Outbox` and
    :class:`~nanobot.delivery.ownership.LaneOwnership` of one process on a shared database."""

    def __init__(
        self, pool: asyncpg.Pool, config: StorageConfig, health: StorageHealth | None = None
    ) -> None:
        self._pool = pool
        self._url = config.url
        self._connect_timeout = config.connect_timeout
        self._ttl = config.lease_seconds
        self._health = health or StorageHealth("outbox")
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._lanes: dict[Lane, int] = {}  # lanes this process holds, with their tokens
        self._valid_until = 0.0  # (monotonic) when our leases end unless renewed
        self._holds: dict[str, float] = {}  # channel -> (monotonic) end of a shared rate-limit hold
        self._enabled: frozenset[str] = frozenset()
        self._lock = asyncio.Lock()  # claims, renewals and releases of this process, one at a time
        self._wake: Callable[[], None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Future[None]] = set()
        self._pruned = False
        self._open = False
        self._next_check = time.monotonic() + self._ttl  # the watcher's next re-read
        self._rescheduled = asyncio.Event()

    # ------------------------------------------------------------------ Outbox

    @property
    def is_open(self) -> bool:
        """True between ``open`` and ``close``."""
        return self._open

    async def open(self) -> None:
        """Ready (the pool is open and migrated by :class:`PgStorage`)."""
        self._open = True
        self._health.opened()

    async def close(self) -> None:
        """Wait for the writes under way; the pool is closed by its owner."""
        if self._writes:
            await asyncio.wait(list(self._writes))
        self._open = False
        self._health.closed()

    async def add(self, messages: list[NewMessage]) -> list[OutboxEntry]:
        """Store ``messages`` in one transaction, claim their free lanes, and tell the others."""
        if not messages:
            return []
        now = time.time()
        # (the intake drops U+0000 already; any other caller's text could not be stored with it)
        rows = [(uuid.uuid4().hex[:16], no_nul(m.channel), no_nul(m.chat_id), m.kind, no_nul(m.content),
                 orjson.dumps({no_nul(k): no_nul(v) for k, v in m.metadata.items()}).decode(),
                 str(State.HELD if m.held else State.PENDING)) for m in messages]  # fmt: skip
        columns = [list(c) for c in zip(*rows, strict=True)]
        lanes = sorted({(r[1], r[2]) for r in rows})
        chats = ([c for c, _ in lanes], [i for _, i in lanes])
        writing = self._writing("cannot store outbox messages")
        async with self._lock, writing, self._pool.acquire() as conn, conn.transaction():
            ids = {r["uid"]: r["id"] for r in await conn.fetch(sql.INSERT, *columns, now)}
            await conn.execute(sql.ENSURE_LANES, *chats)
            enabled, started = sorted(self._enabled), time.monotonic()
            claimed = await conn.fetch(sql.CLAIM, enabled, self.holder, self._ttl, *chats, _CLAIM_BATCH)
            self._take(claimed, started)
            if any(lane not in self._lanes for lane in lanes):
                await conn.execute(sql.NOTIFY)  # (sent at commit) others deliver or release these
        out = []
        for (uid, channel, chat_id, kind, content, _meta, state), m in zip(rows, messages, strict=True):
            meta = dict(m.metadata)
            entry = OutboxEntry(ids[uid], uid, channel, chat_id, kind, content, meta, State(state))
            entry.created_at = entry.updated_at = entry.next_at = now
            out.append(entry)
        return out

    def save_soon(self, entry: OutboxEntry) -> asyncio.Future[None]:
        """Write back ``entry``'s progress, fenced by its lane's token (a lost lane: not written)."""
        token = self._lanes.get((entry.channel, entry.chat_id), -1)
        values = (entry.id, str(entry.state), entry.attempts, entry.parts_done, entry.updated_at,
                  entry.next_at, entry.last_error, token)  # fmt: skip
        write = asyncio.ensure_future(self._save(values, entry.id))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        return write

    async def _save(self, values: tuple[object, ...], ident: int) -> None:
        try:
            async with self._writing("cannot save delivery progress"):
                status = await self._pool.execute(sql.SAVE, *values)
        except StorageError as exc:
            log.error("outbox: %s", exc.message)
            return
        if status != "UPDATE 1":
            log.warning("outbox: message %d: its chat's lane was taken over (or the row dropped); "
                        "its progress is not written", ident)  # fmt: skip

    async def recover(self, enabled: frozenset[str], held_max_age: float) -> list[OutboxEntry]:
        """Release held messages of ``enabled`` channels, claim free lanes, and return the pending
        messages of every lane this process holds, oldest first."""
        self._enabled = enabled
        names = sorted(enabled)
        now = time.time()
        async with self._lock, self._writing("cannot read the outbox"), self._pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(sql.EXPIRE_HELD, names, now, now - held_max_age)
                await conn.execute(sql.RELEASE_HELD, names, now)
                if not self._pruned:
                    await conn.execute(sql.PRUNE_DELIVERED, now - DELIVERED_KEEP_SECONDS)
            self._pruned = True
            await self._renew(conn)
            started = time.monotonic()
            claimed = await conn.fetch(sql.CLAIM, names, self.holder, self._ttl, None, None, _CLAIM_BATCH)
            self._take(claimed, started)
            tokens = list(self._lanes.values())
            rows = await conn.fetch(sql.MINE, self.holder, tokens)
            self._read_holds(await conn.fetch(sql.HOLDS))
            left = await conn.fetchval(sql.NEXT_EXPIRY, names, self.holder, tokens)
        if left is not None:  # another process holds a lane with work: look again when its lease ends
            self._check_in(max(left, 0.0) + 0.01)
        if len(claimed) == _CLAIM_BATCH and self._wake is not None:
            self._wake()  # more lanes wait: claim them at the next re-read
        return [OutboxEntry.from_row(tuple(r)) for r in rows]

    async def pending_before(self, lanes: list[Lane], before: int) -> list[OutboxEntry]:
        """See :meth:`~nanobot.storage.outbox.Outbox.pending_before`."""
        if not lanes:
            return []
        chats = ([c for c, _ in lanes], [i for _, i in lanes])
        async with self._writing("cannot read the outbox"):
            rows = await self._pool.fetch(sql.PENDING_BEFORE, *chats, before)
        return [OutboxEntry.from_row(tuple(r)) for r in rows]

    async def counts(self) -> dict[str, int]:
        """Entries per state, ``delivered`` left out (every process's, for /metrics)."""
        counts = dict.fromkeys(_WAITING, 0)
        with storage_errors("cannot count the outbox", self._url):
            counts.update((r["state"], r["count"]) for r in await self._pool.fetch(sql.COUNTS, _WAITING))
        return counts

    # ------------------------------------------------------------------ LaneOwnership

    async def start(self, wake: Callable[[], None]) -> None:
        """Listen for changes (``wake`` re-reads), keep our leases, and wake at other leases' end."""
        self._wake = wake
        await self._listen()
        for work in (self._keep_leases(), self._watch_expiry()):
            task = asyncio.create_task(work)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Give back every lane (and tell the others, who take them at once); stop listening."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writes:
            await asyncio.wait(list(self._writes))
        async with self._lock:
            tokens, self._lanes = list(self._lanes.values()), {}
            if tokens:
                try:
                    async with self._pool.acquire() as conn, conn.transaction():
                        await conn.execute(sql.RELEASE_ALL, self.holder, tokens)
                        await conn.execute(sql.NOTIFY)
                except DRIVER_ERRORS as exc:
                    log.warning("outbox: lanes not given back (others take them after the lease): %s",
                                reason(exc, self._url))  # fmt: skip
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            with contextlib.suppress(*DRIVER_ERRORS):  # (closing: nothing left to tell)
                await listener.close(timeout=5)

    def holds(self, channel: str, chat_id: str) -> bool:
        """Whether we hold this chat's lane, and our lease has not run out."""
        return (channel, chat_id) in self._lanes and time.monotonic() < self._valid_until

    def held_for(self, channel: str) -> float:
        """Seconds left of a rate-limit hold on ``channel`` (any process's)."""
        end = self._holds.get(channel)
        return 0.0 if end is None else max(0.0, end - time.monotonic())

    def hold(self, channel: str, seconds: float) -> None:
        """Hold ``channel`` here at once, and for every process through the database."""
        self._hold_locally(channel, seconds)
        write = asyncio.ensure_future(self._share_hold(channel, seconds))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    # ------------------------------------------------------------------ inside

    @contextlib.asynccontextmanager
    async def _writing(self, doing: str) -> AsyncIterator[None]:
        """Driver errors as StorageError; the result flips the readiness slot."""
        try:
            with storage_errors(doing, self._url):
                yield
        except StorageError:
            self._health.failed()
            raise
        self._health.succeeded()

    def _take(self, claimed: list[asyncpg.Record], started: float) -> None:
        """Hold the lanes claimed by a statement sent at ``started`` (monotonic)."""
        if claimed and not self._lanes:
            self._valid_until = started + self._ttl * _MARGIN
        for r in claimed:
            self._lanes[(r["channel"], r["chat_id"])] = r["token"]

    async def _renew(self, conn: PoolConnectionProxy) -> None:
        """Extend our leases; forget the lanes taken over meanwhile. Under ``_lock``."""
        if not self._lanes:
            return
        started = time.monotonic()
        lapsed = started >= self._valid_until  # our lanes may have stopped, believing them lost
        kept = await conn.fetch(sql.RENEW, self.holder, list(self._lanes.values()), self._ttl)
        ours = {r["token"] for r in kept}
        lost = [lane for lane, token in self._lanes.items() if token not in ours]
        for lane in lost:
            del self._lanes[lane]
        if lost:
            log.warning("outbox: %d chat lane(s) taken over by another process (lease ran out)", len(lost))
        self._valid_until = started + self._ttl * _MARGIN
        if lapsed and ours and self._wake is not None:
            self._wake()  # still ours after all: re-read, so their messages are queued again

    async def _keep_leases(self) -> None:
        """Renew our leases a few times per lease; give back lanes with nothing left to send."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            if not self._lanes:
                continue
            try:
                async with self._lock, self._writing("cannot renew outbox lanes"):
                    async with self._pool.acquire() as conn:
                        await self._renew(conn)
                        tokens = list(self._lanes.values())
                        released = await conn.fetch(sql.RELEASE_IDLE, self.holder, tokens)
                    gone = {r["token"] for r in released}
                    self._lanes = {lane: t for lane, t in self._lanes.items() if t not in gone}
            except StorageError as exc:
                log.warning("outbox: %s", exc.message)

    def _check_in(self, seconds: float) -> None:
        """Have the watcher re-read in ``seconds`` (unless it will sooner)."""
        when = time.monotonic() + seconds
        if when < self._next_check:
            self._next_check = when
            self._rescheduled.set()

    async def _watch_expiry(self) -> None:
        """Re-read when another process's lease with work ends (it may have died: a crashed
        holder announces nothing), and at least every lease, in case a notification was lost."""
        while True:
            self._rescheduled.clear()
            wait = self._next_check - time.monotonic()
            if wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        await self._rescheduled.wait()
                    continue  # an earlier time was set: sleep until that one
                except TimeoutError:
                    pass
            self._next_check = time.monotonic() + self._ttl
            await self._listen()
            if self._wake is not None:
                self._wake()  # the re-read sets the next time from the leases it sees

    async def _listen(self) -> None:
        """Listen for changes (again, after losing the connection: then re-read at once)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            with storage_errors("cannot listen for outbox changes", self._url):
                self._listener = await listening(
                    self._url, self._connect_timeout, sql.CHANNEL, self._on_notify, self._on_lost
                )
        except StorageError as exc:
            log.warning("outbox: %s (re-reading every %.0fs meanwhile)", exc.message, self._ttl)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        text = str(payload)
        if text.startswith(sql.HOLD_PREFIX):
            seconds, _, channel = text[len(sql.HOLD_PREFIX) :].partition(" ")
            with contextlib.suppress(ValueError):
                self._hold_locally(channel, float(seconds))
            return
        if self._wake is not None:
            self._wake()

    def _on_lost(self, _conn: object) -> None:
        self._listener = None
        if self._wake is not None:
            self._wake()

    def _hold_locally(self, channel: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        self._holds[channel] = max(end, self._holds.get(channel, 0.0))

    def _read_holds(self, rows: list[asyncpg.Record]) -> None:
        for r in rows:
            self._hold_locally(r["channel"], r["seconds"])

    async def _share_hold(self, channel: str, seconds: float) -> None:
        try:
            async with self._writing("cannot share a rate limit"):
                await self._pool.execute(sql.HOLD, channel, seconds)
        except StorageError as exc:
            log.warning("outbox: %s", exc.message)
