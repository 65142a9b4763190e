"""Conversation history per session key, under the session's turn lease.

History lives in memory (a bounded LRU of recent sessions) backed by a
:class:`~nanobot.storage.base.SessionBackend`; turns on one session are serialised by
:class:`~nanobot.storage.base.TurnLeases`. On the embedded SQLite file (one process) reads
come from memory; a session not in memory is loaded once (only if it is known to exist on
disk). On shared storage another process may add a turn at any time, so the memory copy is
used only while holding the session's lease and only when the session's version (taken with
the lease) is the one it was cached at. Session keys are only ever SQL parameters: no path is
built from user input.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from nanobot.errors import NanobotError, StorageError
from nanobot.health import StorageHealth
from nanobot.storage.base import ChatMessage, SessionBackend, SessionInfo, TurnLeases
from nanobot.storage.sqlite.leases import LocalTurnLeases
from nanobot.storage.sqlite.sessions import SqliteBackend

__all__ = ["ChatMessage", "SessionStore", "message_size", "trim_history"]


def message_size(message: ChatMessage) -> int:
    """The text a message carries (its content and tool-call arguments), in characters."""
    content = message.get("content")
    size = len(content) if isinstance(content, str) else 0
    for call in message.get("tool_calls") or ():
        size += len(call["function"]["arguments"])
    return size


def trim_history(messages: list[ChatMessage], limit: int, max_chars: int = 0) -> list[ChatMessage]:
    """The last ``limit`` messages (and, with ``max_chars``, no more text than that), starting
    at a user message so no tool result loses its call."""
    start = max(0, len(messages) - limit)
    if max_chars:
        total = 0
        for i in range(len(messages) - 1, start - 1, -1):
            total += message_size(messages[i])
            if total > max_chars:
                start = i + 1
                break
    while start < len(messages) and messages[start].get("role") != "user":
        start += 1
    return messages[start:] if start else messages


# Counted per cached message on top of its text: the dict and its keys cost memory too.
_MESSAGE_OVERHEAD = 64


def _cost(messages: Sequence[ChatMessage]) -> int:
    return sum(message_size(m) for m in messages) + _MESSAGE_OVERHEAD * len(messages)


class SessionStore:
    """History per session key, cached in memory, persisted through a :class:`SessionBackend`,
    one turn at a time per session through :class:`TurnLeases`.

    The cache is bounded by size (``cache_bytes``, roughly the text it holds) and by count:
    least recently used sessions are dropped first and reloaded from disk when next needed;
    a session larger than the whole bound is never cached.
    """

    def __init__(
        self,
        backend: SessionBackend,
        leases: TurnLeases | None = None,
        *,
        max_messages: int = 100,
        max_chars: int = 0,
        cache_size: int = 10_000,
        cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._backend = backend
        self._leases: TurnLeases = LocalTurnLeases() if leases is None else leases
        self._hold = self._leases.hold  # (bound once: ``lock`` is on every turn's path)
        # Other processes write these sessions: the cache is checked against each session's version.
        self._shared = self._leases.shared
        self._max = max_messages
        self._max_chars = max_chars
        self._cache_size = cache_size
        self._cache_limit = cache_bytes
        self._cache: OrderedDict[str, list[ChatMessage]] = OrderedDict()
        self._costs: dict[str, int] = {}  # key -> its cached messages' approximate size
        self._versions: dict[str, int | None] = {}  # (shared storage) key -> the version cached
        self._cache_bytes = 0
        self._known: set[str] = set()

    def lock(self, key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with store.lock(key):`` holds ``key``'s turn lease: turns on one session never
        interleave (FIFO); in one process nearly free when nobody waits (see
        :mod:`nanobot.storage.keylock`)."""
        return self._hold(key)

    @classmethod
    async def open(
        cls,
        workspace: Path,
        *,
        max_messages: int = 100,
        max_chars: int = 0,
        cache_bytes: int = 64 * 1024 * 1024,
        health: StorageHealth | None = None,
    ) -> SessionStore:
        """Open (or create) the session database under ``workspace``."""
        backend = SqliteBackend(workspace / "sessions.db", health)
        await backend.open()
        store = cls(backend, max_messages=max_messages, max_chars=max_chars, cache_bytes=cache_bytes)
        try:
            store._known = await backend.keys()
        except BaseException:
            await backend.close()
            raise
        return store

    @property
    def cache_bytes(self) -> int:
        """Approximate size of the histories held in memory (at most ``cache_bytes``)."""
        return self._cache_bytes

    async def close(self) -> None:
        """Flush pending writes, stop the leases' background work, close the backend."""
        await self._backend.close()
        await self._leases.close()

    async def history(self, key: str) -> list[ChatMessage]:
        """The bounded history of ``key`` (a copy the caller may extend)."""
        if self._shared:
            return await self._shared_history(key)
        cached = self._cache.get(key)
        if cached is None:
            if key not in self._known:  # a new session: cached by append_turn, with its first turn
                return []
            cached = trim_history(await self._backend.load(key, self._max), self._max)
            self._remember(key, cached, _cost(cached))
        else:
            self._cache.move_to_end(key)
        return list(trim_history(cached, self._max, self._max_chars))

    async def append_turn(self, key: str, messages: Sequence[ChatMessage]) -> None:
        """Persist one whole turn at once and make it part of the history.

        The memory copy is updated first so the next turn on this session sees it. A turn
        that reached this point is stored whole even if its client goes away: the row is
        with the writer already, and cancelling the wait only cancels the wait. If the
        commit fails, or its outcome is not waited for, the memory copy is dropped (the next
        turn reloads it, queued behind this write).
        """
        if self._shared:
            return await self._shared_append(key, messages)
        try:  # serialised before the memory copy changes: a turn that cannot be stored leaves no trace
            committed = self._backend.append(key, messages)
        except (TypeError, ValueError) as exc:
            raise NanobotError(f"could not save the conversation: {exc}") from exc
        cached = self._cache.get(key)
        if cached is None and key not in self._known:  # a new session: this turn is its history
            cached = list(messages)
            cost = _cost(cached)
        elif cached is not None:  # (if it was evicted meanwhile, the next turn reloads it)
            cached.extend(messages)
            cost = self._costs[key] + _cost(messages)
        if cached is not None:
            if len(cached) > self._max * 2:
                cached = trim_history(cached, self._max)
                cost = _cost(cached)
            self._remember(key, cached, cost)
        self._known.add(key)
        # A plain await, no asyncio.shield: the writer's future is settled whether or not anyone
        # waits (a cancelled one is skipped), so a shield only added a future, a callback and a
        # loop iteration per turn (callgrind: 15k instructions at c=1, 19k at c=16).
        try:
            await committed
        except StorageError as exc:
            self._forget(key)
            raise StorageError(f"could not save the conversation: {exc}") from exc
        except asyncio.CancelledError:
            self._forget(key)  # (the write may yet fail: trust the disk, not this copy)
            raise

    # -- shared storage: the cache is trusted only at the version the lease was taken at
    async def _shared_history(self, key: str) -> list[ChatMessage]:
        lease = self._leases.current(key)
        cached = self._cache.get(key)
        if lease is not None and cached is not None and self._versions.get(key) == lease.version:
            self._cache.move_to_end(key)
            return list(trim_history(cached, self._max, self._max_chars))
        if lease is not None and lease.version is None:
            stored: list[ChatMessage] = []  # no turns yet: nothing to read
        else:
            stored = trim_history(await self._backend.load(key, self._max), self._max)
        if lease is not None:  # (outside a lease nothing is cached: it could not be checked)
            self._remember(key, stored, _cost(stored), lease.version)
        return list(trim_history(stored, self._max, self._max_chars))

    async def _shared_append(self, key: str, messages: Sequence[ChatMessage]) -> None:
        """Write the turn, fenced by (and giving back) the lease held on ``key``; then the memory
        copy moves to the version the write made, if it was at the lease's version."""
        lease = self._leases.current(key)
        try:  # (a future already: ensure_future returns it as it is)
            committed = asyncio.ensure_future(self._backend.append(key, messages, lease))
        except (TypeError, ValueError) as exc:
            raise NanobotError(f"could not save the conversation: {exc}") from exc
        if lease is not None:
            # The write gives the lease back, whether or not anyone still waits for it (it may be
            # queued behind other turns' statements): leaving the block must not give it back
            # first, or the write would find its lease gone and the turn would be lost.
            lease.write = committed
        try:  # (its StorageError says what failed: "cannot save the conversation (PostgreSQL ...)")
            version = await asyncio.shield(committed)
        except BaseException:
            self._forget(key)
            raise
        cached = self._cache.get(key)
        if lease is None or cached is None or self._versions.get(key) != lease.version:
            self._forget(key)
            return
        cached.extend(messages)
        if len(cached) > self._max * 2:
            cached = trim_history(cached, self._max)
        self._remember(key, cached, _cost(cached), version)

    # -- sessions over HTTP: listing, reading, renaming, deleting (off the turn path)
    async def page(self, prefix: str, limit: int, after: str | None) -> tuple[list[SessionInfo], bool] | None:
        """Sessions whose key starts with ``prefix``, newest first (see :meth:`SessionBackend.page`)."""
        try:
            return await self._backend.page(prefix, limit, after)
        except StorageError as exc:
            raise StorageError(f"could not list the sessions: {exc}") from exc

    async def read(
        self, key: str, max_messages: int, max_bytes: int
    ) -> tuple[SessionInfo, list[ChatMessage], bool] | None:
        """The whole stored history of ``key`` (not only the model's window), bounded."""
        try:
            return await self._backend.read(key, max_messages, max_bytes)
        except StorageError as exc:
            raise StorageError(f"could not read the conversation: {exc}") from exc

    async def rename(self, key: str, title: str) -> SessionInfo | None:
        """Set the title of an existing session."""
        try:
            return await self._backend.rename(key, title)
        except StorageError as exc:
            raise StorageError(f"could not rename the conversation: {exc}") from exc

    async def delete(self, key: str) -> bool:
        """Forget ``key`` on disk and in memory; waits for a running turn (the turn lease), so it
        never interleaves with one, and the next turn starts fresh."""
        async with self.lock(key):
            # Shielded, and the memory copy dropped first: a client that goes away mid-way
            # cannot leave a cached history whose rows are gone (or the reverse).
            deleting = asyncio.ensure_future(self._backend.delete(key))
            self._forget(key)
            self._known.discard(key)
            try:
                return await asyncio.shield(deleting)
            except StorageError as exc:
                self._known.add(key)  # still on disk: the next turn reloads it
                raise StorageError(f"could not delete the conversation: {exc}") from exc

    def _remember(self, key: str, messages: list[ChatMessage], cost: int, version: int | None = None) -> None:
        """Cache ``key`` (at ``version``, on shared storage) as most recently used, then drop the
        least recently used over the bounds."""
        self._forget(key)
        if cost > self._cache_limit:
            return  # bigger than the whole cache: read from disk each time instead
        self._cache[key] = messages
        self._costs[key] = cost
        if self._shared:
            self._versions[key] = version
        self._cache_bytes += cost
        while self._cache_bytes > self._cache_limit or len(self._cache) > self._cache_size:
            self._forget(next(iter(self._cache)))

    def _forget(self, key: str) -> None:
        if self._cache.pop(key, None) is not None:
            self._cache_bytes -= self._costs.pop(key)
            if self._shared:
                self._versions.pop(key, None)
