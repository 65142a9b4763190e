"""Per-key FIFO locks that cost almost nothing when nobody waits.

Every turn takes its session's lock, and nearly always nobody else holds it: then taking it
is one dict insert and releasing it one dict delete: no ``asyncio.Lock``, no generator-based
context manager, no future. Only a second turn on a held key waits, on a future of its own;
release hands the lock to the oldest waiter directly (FIFO: turns on one session run in the
order they arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from types import TracebackType


class KeyedLocks:
    """One lock per key, existing only while held."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        # key -> the futures of its waiters (None: held, nobody waiting)
        self._held: dict[str, deque[asyncio.Future[None]] | None] = {}

    def __call__(self, key: str) -> _Holding:
        """``async with locks(key):`` holds ``key``'s lock for the block."""
        return _Holding(self, key)

    def held(self, key: str) -> bool:
        """Whether ``key``'s lock is held."""
        return key in self._held

    def try_acquire(self, key: str) -> bool:
        """Take ``key``'s lock if it is free (the usual case: no await at all)."""
        held = self._held
        if key in held:
            return False
        held[key] = None
        return True

    async def acquire(self, key: str) -> None:
        """Take ``key``'s lock, waiting behind earlier holders."""
        if self.try_acquire(key):
            return
        waiters = self._held[key]
        if waiters is None:
            waiters = self._held[key] = deque()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed the lock, then cancelled: pass it on
                self.release(key)
            else:
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)
            raise

    def release(self, key: str) -> None:
        """Hand ``key``'s lock to its oldest waiter, or free it."""
        waiters = self._held[key]
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the waiter owns the lock now
                return
        del self._held[key]


class _Holding:
    __slots__ = ("_key", "_locks")

    def __init__(self, locks: KeyedLocks, key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        if not self._locks.try_acquire(self._key):
            await self._locks.acquire(self._key)

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._locks.release(self._key)
