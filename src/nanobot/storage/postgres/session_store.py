"""The gateway's session store on PostgreSQL: every process sees every turn, one turn at a time.

A :class:`~nanobot.sessions.SessionStore` whose turn lock is the session's lease in PostgreSQL
(renewed while the turn runs; its token fences the turn's write) and whose history is read from
the database at each turn: another process may have added a turn since, so nothing is cached
yet (the restructuring of issue 9 brings back a cache checked against the session's version).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar

from nanobot.errors import NanobotError, StorageError
from nanobot.sessions import ChatMessage, SessionStore, trim_history
from nanobot.storage.postgres.store import PgStorage

log = logging.getLogger(__name__)

# The lease the current turn holds, as (key, token): set by ``lock`` in the turn's own task, so a
# turn that outlived its lease can never borrow the token of the turn that took over.
_held: ContextVar[tuple[str, int] | None] = ContextVar("nanobot_session_lease", default=None)


class PgSessionStore(SessionStore):
    """Sessions shared by every process on one PostgreSQL database."""

    def __init__(
        self, storage: PgStorage, *, lease_seconds: float, max_messages: int, max_chars: int
    ) -> None:
        super().__init__(storage.sessions, max_messages=max_messages, max_chars=max_chars, cache_bytes=0)
        self._storage = storage
        self._ttl = lease_seconds
        self._holder = f"{socket.gethostname()}:{os.getpid()}"

    async def close(self) -> None:
        """Finish the writes under way and close the storage."""
        await self._storage.close()

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        """Hold ``key``'s lease: turns on one session never interleave, in any process."""
        leases = self._storage.leases
        token = await leases.acquire(key, self._holder, self._ttl)
        held = _held.set((key, token))
        renewing = asyncio.create_task(self._renew(key, token), name="nanobot-lease-renew")
        try:
            yield
        finally:
            renewing.cancel()
            _held.reset(held)
            # Shielded: a cancelled turn still frees its session at once rather than at expiry.
            release = asyncio.ensure_future(leases.release(key, token))
            try:
                await asyncio.shield(release)
            except StorageError as exc:
                log.warning("session lease not released (it expires on its own): %s", exc)

    async def _renew(self, key: str, token: int) -> None:
        """Keep the lease while the turn runs; once lost, the turn's write will be refused."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                held = await self._storage.leases.renew(key, token, self._ttl)
            except StorageError as exc:
                log.warning("session lease not renewed: %s", exc)
                continue
            if not held:
                log.warning("session %r: lease lost to another holder; this turn will not be saved", key)
                return

    async def history(self, key: str) -> list[ChatMessage]:
        """The bounded history of ``key``, as stored now (whichever process wrote it)."""
        stored = await self._storage.sessions.load(key, self._max)
        return list(trim_history(stored, self._max, self._max_chars))

    async def append_turn(self, key: str, messages: Sequence[ChatMessage]) -> None:
        """Persist one whole turn, fenced by the lease held on ``key`` (if any)."""
        lease = _held.get()
        token = lease[1] if lease is not None and lease[0] == key else None
        try:
            committed = self._storage.sessions.append(key, messages, token)
        except (TypeError, ValueError) as exc:
            raise NanobotError(f"could not save the conversation: {exc}") from exc
        await asyncio.shield(committed)

    async def delete(self, key: str) -> bool:
        """Forget ``key`` everywhere, never in the middle of one of its turns (any process's)."""
        async with self.lock(key):
            return await asyncio.shield(asyncio.ensure_future(self._storage.sessions.delete(key)))
