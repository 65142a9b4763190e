"""One leader per polling channel across processes, and the record of inbound update ids.

Leadership is ``pg_try_advisory_lock`` on a *dedicated* connection (never one from the pool: a
session-level lock lives exactly as long as its connection). The lock's key is derived from the
channel's name and a digest of its bot token, never the token itself, so two bots on one
database each get their own leader. A follower tries again every second. When the leader's
process dies its connection closes, the server drops the lock, and a follower takes over at its
next try. A whole machine lost closes nothing: the connection asks the server for TCP keepalives
(and a user timeout), so the server notices a silent peer within seconds and drops the lock;
the leader side notices the same loss by a heartbeat query, so it stops polling before anyone
else can start.

Update ids go into ``inbound_updates`` (INSERT ... ON CONFLICT DO NOTHING RETURNING) before an
update is handed on: what comes back is what nobody took yet. Old rows are pruned (Telegram
keeps an unconfirmed update for 24 hours). The same connection serves these statements, one at
a time: the leader inserts a batch per ``getUpdates``, webhook calls one row each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence

import asyncpg

from nanobot.errors import StorageError
from nanobot.storage.inbound import ResumePoint, Work
from nanobot.storage.postgres.connect import DRIVER_ERRORS, storage_errors
from nanobot.storage_config import StorageConfig

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # how often a follower tries to take the lead
RETRY_MAX_SECONDS = 5.0  # the longest wait between tries while the database is unreachable
HEARTBEAT_SECONDS = 2.0  # the leader checks its connection this often ...
HEARTBEAT_TIMEOUT = 3.0  # ... and steps down when a check takes longer than this
KEEP_SECONDS = 2 * 86400.0  # how long an update id is remembered
PRUNE_EVERY = 3600.0  # seconds between prunes of old ids, per process and channel
# Server-side socket options for the dedicated connection (PostgreSQL >= 12; ignored on unix
# sockets): a lost peer is found by keepalive probes (idle 5 s, then 3 probes 2 s apart) or, with
# data unacknowledged, by the user timeout: its backend ends and the lock is free in ~11 s.
KEEPALIVE = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "nanobot channel leader",
}

_RECORD = """
INSERT INTO inbound_updates (channel, update_id) SELECT $1, unnest($2::text[])
ON CONFLICT DO NOTHING RETURNING update_id
"""
# The same, and where the channel's session stands, in one statement (one round trip, one commit).
_RECORD_AT = """
WITH saved AS (
    INSERT INTO inbound_sessions AS s (channel, session_id, resume_url, seq) VALUES ($1, $3, $4, $5)
    ON CONFLICT (channel) DO UPDATE SET session_id = EXCLUDED.session_id,
        resume_url = EXCLUDED.resume_url, seq = EXCLUDED.seq, saved_at = now()
    RETURNING 1
)
INSERT INTO inbound_updates (channel, update_id) SELECT $1, unnest($2::text[])
ON CONFLICT DO NOTHING RETURNING update_id
"""
_RESUME_POINT = "SELECT session_id, resume_url, seq FROM inbound_sessions WHERE channel = $1"
_PRUNE = "DELETE FROM inbound_updates WHERE channel = $1 AND seen_at < now() - make_interval(secs => $2)"


def channel_key(channel: str, token: str) -> tuple[str, int]:
    """``channel``'s name in ``inbound_updates`` (``telegram:<token digest>``) and its lock key."""
    digest = hashlib.sha256(token.encode()).hexdigest()[:16]
    name = f"{channel}:{digest}"
    key = hashlib.sha256(f"nanobot channel leader {name}".encode()).digest()[:8]
    return name, int.from_bytes(key, "big", signed=True)


class PgChannelInbound:
    """A channel's leadership and update-id record on PostgreSQL, for one process."""

    def __init__(
        self, config: StorageConfig, channel: str, token: str, *, retry: float = RETRY_SECONDS
    ) -> None:
        self._url = config.url
        self._connect_timeout = config.connect_timeout
        self._channel = channel
        self.name, self._lock_key = channel_key(channel, token)
        self._retry = retry
        self._conn: asyncpg.Connection | None = None
        self._io = asyncio.Lock()  # one statement at a time on the one connection
        self._lost = asyncio.Event()  # set when the current connection ends
        self._leading = False
        self._pruned_at = float("-inf")

    def __repr__(self) -> str:
        return f"PgChannelInbound({self.name!r}, leading={self._leading})"

    @property
    def resumable(self) -> bool:
        """Always: the next leader, in any process on the database, resumes the session."""
        return True

    @property
    def leading(self) -> bool:
        """Whether this process holds the channel's lock now."""
        return self._leading

    async def lead(self, work: Work) -> None:
        """Run ``work`` while this process holds the lock: wait for it (trying every second),
        run, cancel ``work`` when the connection is lost, and wait again."""
        while True:
            lost = await self._take_lead()
            self._leading = True
            log.info("%s: this process leads (it receives the channel's updates)", self._channel)
            try:
                finished = await self._run_while_held(work, lost)
            finally:
                self._leading = False
            if finished:
                return
            log.warning("%s: lost the lead (database connection lost); waiting to lead again", self._channel)

    async def _take_lead(self) -> asyncio.Event:
        """Try the lock until this process holds it; the event set when its connection ends."""
        failures = 0
        told = False
        while True:
            try:
                async with self._io:
                    conn = await self._connection()
                    with storage_errors(f"cannot take the {self._channel} lead", self._url):
                        held = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key)
                if held:
                    return self._lost
                failures = 0
                if not told:
                    told = True
                    log.info("%s: another process leads; this one sends only", self._channel)
            except StorageError as exc:
                failures += 1
                if failures == 1:  # once per outage, not every second
                    log.warning("%s: %s; trying again", self._channel, exc.message)
            await asyncio.sleep(min(RETRY_MAX_SECONDS, self._retry * 2 ** max(failures - 1, 0)))

    async def _run_while_held(self, work: Work, lost: asyncio.Event) -> bool:
        """Run ``work`` until it returns (True) or the lead is lost (False)."""
        job = asyncio.ensure_future(work())
        watch = asyncio.ensure_future(self._watch(lost))
        try:
            await asyncio.wait((job, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (job, watch):
                task.cancel()
            await asyncio.gather(job, watch, return_exceptions=True)
        if not job.done() or job.cancelled():
            return False
        await self._give_up()  # (first: a failed leader must not keep the channel from the others)
        job.result()  # work's own error, if it failed
        return True

    async def _watch(self, lost: asyncio.Event) -> None:
        """Return when the connection is lost, or stops answering within the heartbeat timeout."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_SECONDS):
                    await lost.wait()
            if lost.is_set():
                return
            try:
                async with asyncio.timeout(HEARTBEAT_TIMEOUT), self._io:
                    conn = self._conn
                    if conn is None or conn.is_closed():
                        return
                    with storage_errors("leader heartbeat", self._url):
                        await conn.execute("SELECT 1")
            except (TimeoutError, StorageError) as exc:
                log.warning("%s: the database stopped answering (%s); stepping down", self._channel, exc)
                self._drop()  # if the server still holds the lock, closing frees it
                return

    async def fresh(self, ids: Sequence[str], resume: ResumePoint | None = None) -> list[str]:
        """Record ``ids`` (and ``resume``); those no process took before, in order (StorageError:
        none recorded)."""
        unique = list(dict.fromkeys(ids))
        if not unique and resume is None:
            return []
        doing = f"cannot record {self._channel} update ids"
        try:
            # Bounded: a Discord leader records from its Gateway reader, which must keep reading.
            async with asyncio.timeout(self._connect_timeout), self._io:
                conn = await self._connection()
                with storage_errors(doing, self._url):
                    if time.monotonic() - self._pruned_at > PRUNE_EVERY:
                        await conn.execute(_PRUNE, self.name, KEEP_SECONDS)
                        self._pruned_at = time.monotonic()
                    if resume is None:
                        rows = await conn.fetch(_RECORD, self.name, unique)
                    else:
                        rows = await conn.fetch(_RECORD_AT, self.name, unique, *resume)
        except TimeoutError:
            self._drop()  # (a leader steps down with it: the database does not answer)
            raise StorageError(f"{doing}: the database did not answer") from None
        new = {row["update_id"] for row in rows}
        return [i for i in unique if i in new]

    async def resume_point(self) -> ResumePoint | None:
        """Where the channel's session stood when a leader last recorded a message (or READY)."""
        doing = f"cannot read where the {self._channel} session stands"
        try:
            async with asyncio.timeout(self._connect_timeout), self._io:
                conn = await self._connection()
                with storage_errors(doing, self._url):
                    row = await conn.fetchrow(_RESUME_POINT, self.name)
        except TimeoutError:
            raise StorageError(f"{doing}: the database did not answer") from None
        return None if row is None else ResumePoint(row["session_id"], row["resume_url"], row["seq"])

    async def close(self) -> None:
        """Close the connection (the server frees the lock with it)."""
        conn, self._conn = self._conn, None
        self._lost.set()
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(*DRIVER_ERRORS):  # (closing: nothing left to tell)
                await conn.close(timeout=5)

    async def _give_up(self) -> None:
        """Release the lock, keeping the connection (``work`` ended on its own)."""
        with contextlib.suppress(StorageError):
            async with self._io:
                conn = self._conn
                if conn is not None and not conn.is_closed():
                    with storage_errors("cannot release the lead", self._url):
                        await conn.execute("SELECT pg_advisory_unlock($1)", self._lock_key)

    # -- the dedicated connection
    async def _connection(self) -> asyncpg.Connection:
        """The open connection, or a new one (call with ``_io`` held)."""
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        with storage_errors(f"cannot connect for the {self._channel} channel", self._url):
            conn = await asyncpg.connect(self._url, timeout=self._connect_timeout, server_settings=KEEPALIVE)
        conn.add_termination_listener(self._on_lost)
        self._conn, self._lost = conn, asyncio.Event()
        return conn

    def _on_lost(self, conn: object) -> None:
        if conn is self._conn:
            self._conn = None
            self._lost.set()

    def _drop(self) -> None:
        """Abandon a connection that stopped answering."""
        conn, self._conn = self._conn, None
        self._lost.set()
        if conn is not None:
            conn.terminate()
