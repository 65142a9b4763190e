"""Turn leases on PostgreSQL: one turn per session at a time, across every process.

A lease is a row of ``turn_leases`` (session, holder, token, expires_at). :meth:`acquire` takes
it when there is none or the current one has expired, with a new token from one sequence, so
tokens only grow: a holder that stalled past its lease holds a token that no longer matches,
and :meth:`PgSessionBackend.append` refuses its write (fencing). Expiry is judged by the
server's clock, so the machines' clocks do not matter.

:meth:`PgTurnLeases.hold` is the :class:`~nanobot.storage.base.TurnLeases` seam the session
store uses: it takes the lease (one round trip, which also reads the session's version), renews
it while the turn runs, and gives it back on leaving unless the turn's write already did (the
write and the release are one statement: see :mod:`.sessions`).

Waiting is FIFO within a process (a local lock per session: only the oldest local waiter
contends in PostgreSQL) and first-come across processes. Waiters sleep until a release is
announced with ``NOTIFY`` (one listening connection per process) or the current lease expires
(a holder that crashed never announces anything): no polling loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextvars import ContextVar

import asyncpg

from nanobot.errors import LeaseLostError, StorageError
from nanobot.storage.base import Lease
from nanobot.storage.keylock import KeyedLocks
from nanobot.storage.postgres.batches import Row, Statement, StatementGroups
from nanobot.storage.postgres.connect import DRIVER_ERRORS, listening, reason, storage_errors
from nanobot.storage_config import StorageConfig

log = logging.getLogger(__name__)

CHANNEL = "nanobot_turn_lease"

# Take the lease if it is free or expired (with the session's version); else say how long the
# current one has left (NULL when it was released meanwhile: try again). See migrations._V2_storage.
_ACQUIRE = "SELECT token, remaining, version FROM nanobot_take_turn_lease($1, $2, $3)"
_ACQUIRE_GROUPED = "SELECT session, token, remaining, version FROM nanobot_take_turn_leases($1, $2, $3)"
_RENEW = """
UPDATE turn_leases SET expires_at = clock_timestamp() + make_interval(secs => $3)
WHERE session = $1 AND token = $2
"""
_RELEASE = f"""
WITH gone AS (DELETE FROM turn_leases WHERE session = $1 AND token = $2 RETURNING session, waited)
SELECT CASE WHEN waited THEN pg_notify('{CHANNEL}', md5(session)) END FROM gone
"""
_RACE_RETRY = 0.01  # seconds before trying again after the race above (rare)

# The lease the current turn holds: set by ``hold`` in the turn's own task, so a turn that
# outlived its lease can never borrow the token of the turn that took over.
_held: ContextVar[Lease | None] = ContextVar("nanobot_session_lease", default=None)


def _digest(key: str) -> str:
    """What a release announces: md5 of the key (a NOTIFY payload is bounded; keys are not)."""
    return hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()


_Attempt = tuple[int | None, float | None, int | None]  # token, remaining, version


def _failed(write: asyncio.Future[int | None]) -> bool:
    """Whether a turn's write ended without giving its lease back (a storage error; a write
    refused for a lost lease has nothing to give back)."""
    return not write.cancelled() and isinstance(write.exception(), StorageError) and not isinstance(
        write.exception(), LeaseLostError
    )


def _taken(_key: str, row: Row) -> _Attempt:
    """An attempt's outcome: (token, None, version) when taken, else (None, seconds the current
    lease has left or None when it was released meanwhile, None)."""
    if row is None:  # (a grouped attempt's session whose lease went away meanwhile)
        return None, None, None
    return row["token"], row["remaining"], row["version"]


class PgTurnLeases:
    """Session turn leases with fencing tokens, shared by every process on one database."""

    def __init__(self, pool: asyncpg.Pool, config: StorageConfig, groups: StatementGroups) -> None:
        self._pool = pool
        self._groups = groups  # (the per-turn statement: taking the lease)
        self._take = Statement("cannot take a session lease", _ACQUIRE, _ACQUIRE_GROUPED, _taken)
        self._url = config.url
        self._ttl = config.lease_seconds
        self._name = f"{socket.gethostname()}:{os.getpid()}"  # the holder, for diagnostics
        self._connect_timeout = config.connect_timeout
        self._listener: asyncpg.Connection | None = None
        self._listening = asyncio.Lock()
        self._wakeups: dict[str, set[asyncio.Event]] = {}
        self._local = KeyedLocks()  # this process's turns on one session: the oldest contends
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def shared(self) -> bool:
        """Always: every process on the database writes the same sessions."""
        return True

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold ``key``'s lease for the block: turns on one session never interleave, in any
        process. Renewed while held; given back on leaving (unless the turn's write did)."""
        lease = await self.acquire(key, self._name, self._ttl)
        held = _held.set(lease)
        # A timer, not a task, until the first renewal is due: most turns end long before it, and
        # a task per turn (created, then cancelled) is a measurable share of a turn's cost.
        renewing: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            self._ttl / 3,
            lambda: renewing.append(loop.create_task(self._renew(lease), name="nanobot-lease-renew")),
        )
        try:
            yield
        finally:
            timer.cancel()
            for task in renewing:
                task.cancel()
            _held.reset(held)
            write = lease.write
            if write is not None and not write.done():  # (queued: the turn's client went away)
                write.add_done_callback(lambda done: self._after_write(lease, done))
            elif write is None or _failed(write):
                # Shielded: a cancelled turn still frees its session at once rather than at expiry.
                release = asyncio.ensure_future(self.release(key, lease.token))
                try:
                    await asyncio.shield(release)
                except StorageError as exc:
                    log.warning("session lease not released (it expires on its own): %s", exc)

    def _after_write(self, lease: Lease, write: asyncio.Future[int | None]) -> None:
        """A write that outlived its turn's block: give the lease back if it could not."""
        if _failed(write):
            cleanup = asyncio.ensure_future(self._release_quietly(lease))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)

    async def _release_quietly(self, lease: Lease) -> None:
        try:
            await self.release(lease.key, lease.token)
        except StorageError as exc:
            log.warning("session lease not released (it expires on its own): %s", exc)

    def current(self, key: str) -> Lease | None:
        """The lease this task's turn holds on ``key``, if any."""
        lease = _held.get()
        return lease if lease is not None and lease.key == key else None

    async def _renew(self, lease: Lease) -> None:
        """Keep the lease while the turn runs (from a third of its time on, then every third);
        once lost, the turn's write will be refused."""
        while lease.write is None:  # (handed over: the write gives the lease back)
            try:
                held = await self.renew(lease.key, lease.token, self._ttl)
            except StorageError as exc:
                log.warning("session lease not renewed: %s", exc)
                held = True  # (unknown: try again at the next third)
            if not held and lease.write is None:
                log.warning(
                    "session %r: lease lost to another holder; this turn will not be saved", lease.key
                )
                return
            await asyncio.sleep(self._ttl / 3)

    async def acquire(self, key: str, holder: str, ttl: float) -> Lease:
        """Wait for ``key``'s lease and take it for ``ttl`` seconds; its fencing token, and the
        session's version when taken.

        ``holder`` names the taker (process and turn) for diagnostics. Cancelling the wait
        leaves no lease behind.
        """
        local = self._local
        if not local.try_acquire(key):  # (the usual case takes it without an await or a Lock)
            await local.acquire(key)  # the oldest local waiter contends; the others queue behind it
        try:
            return await self._contend(key, holder, ttl)
        finally:
            local.release(key)

    async def _contend(self, key: str, holder: str, ttl: float) -> Lease:
        # First one try with nothing registered: a free session (nearly always) costs no Event.
        token, _remaining, version = await self._try(key, holder, ttl)
        if token is not None:
            return Lease(key, token, version)
        digest = _digest(key)
        while True:
            await self._listen()
            woken = asyncio.Event()  # registered before trying, so a release in between is seen
            self._wakeups.setdefault(digest, set()).add(woken)
            try:
                token, remaining, version = await self._try(key, holder, ttl)
                if token is not None:
                    return Lease(key, token, version)
                wait = _RACE_RETRY if remaining is None else max(remaining, 0.0) + 0.001
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await woken.wait()
            finally:
                waiting = self._wakeups[digest]
                waiting.discard(woken)
                if not waiting:
                    del self._wakeups[digest]

    async def _try(self, key: str, holder: str, ttl: float) -> _Attempt:
        """One attempt; shielded, so a cancelled caller cannot leave a lease nobody knows of."""
        attempt: asyncio.Future[_Attempt]
        attempt = self._groups.submit(self._take, key, holder, ttl)
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            cleanup = asyncio.ensure_future(self._undo(key, attempt))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            raise

    async def _undo(self, key: str, attempt: asyncio.Future[_Attempt]) -> None:
        try:
            token, _remaining, _version = await attempt
            if token is not None:
                await self.release(key, token)
        except (StorageError, *DRIVER_ERRORS) as exc:
            log.warning("a cancelled turn's session lease expires on its own: %s", reason(exc, self._url))

    async def renew(self, key: str, token: int, ttl: float) -> bool:
        """Extend the lease by ``ttl`` seconds from now; False when ``token`` no longer holds it."""
        with storage_errors("cannot renew a session lease", self._url):
            status = await self._pool.execute(_RENEW, key, token, ttl)
        return status == "UPDATE 1"

    async def release(self, key: str, token: int) -> bool:
        """Give the lease back and wake its waiters; False when ``token`` no longer held it."""
        with storage_errors("cannot release a session lease", self._url):
            rows = await self._pool.fetch(_RELEASE, key, token)
        return bool(rows)

    async def holder(self, key: str) -> tuple[str, int] | None:
        """Who holds ``key``'s unexpired lease, and its token (for diagnostics and tests)."""
        with storage_errors("cannot read a session lease", self._url):
            row = await self._pool.fetchrow(
                "SELECT holder, token FROM turn_leases WHERE session = $1 AND expires_at > clock_timestamp()",
                key,
            )
        return None if row is None else (row["holder"], row["token"])

    async def close(self) -> None:
        """Stop listening; wait for the clean-up of cancelled attempts."""
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            with contextlib.suppress(*DRIVER_ERRORS):  # (closing: nothing left to tell)
                await listener.close(timeout=5)

    # -- wake-ups
    async def _listen(self) -> None:
        """Make sure this process listens for releases (again, after losing the connection)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        async with self._listening:
            if self._listener is not None and not self._listener.is_closed():
                return
            with storage_errors("cannot listen for session leases", self._url):
                # (lost notifications cost at most the rest of a lease: waiters also wake at expiry)
                self._listener = await listening(
                    self._url, self._connect_timeout, CHANNEL, self._on_release, self._on_lost
                )

    def _on_release(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        for woken in self._wakeups.get(str(payload), ()):
            woken.set()

    def _on_lost(self, _conn: object) -> None:
        for waiting in self._wakeups.values():  # (they try again, then listen on a new connection)
            for woken in waiting:
                woken.set()
