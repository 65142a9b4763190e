"""Conversation history per session key, and the per-session turn locks.

History lives in memory (a bounded LRU of recent sessions) backed by an embedded
SQLite file under the workspace. Reads come from memory; a session not in memory is
loaded once (only if it is known to exist on disk). Writes go to one database thread
that commits whatever has queued up in one transaction (group commit), so a turn costs
no thread hop of its own and the event loop never touches the disk. Session keys are
only ever SQL parameters: no path is built from user input.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Protocol

from nanobot.errors import NanobotError, StorageError
from nanobot.health import StorageHealth
from nanobot.keylock import KeyedLocks
from nanobot.session_db import SqliteBackend
from nanobot.session_table import SessionInfo

ChatMessage = dict[str, Any]  # one message in OpenAI chat format (JSON-shaped by nature)


class SessionBackend(Protocol):
    """Where history is kept; SQLite here, a shared engine when one machine is outgrown."""

    async def keys(self) -> set[str]:
        """Every session key that has history."""
        ...

    async def load(self, key: str, limit: int) -> list[ChatMessage]:
        """At least the last ``limit`` messages of a session (whole turns), oldest first."""
        ...

    def append(self, key: str, messages: Sequence[ChatMessage]) -> Awaitable[object]:
        """Durably add one turn's messages to a session; the awaitable resolves once committed.

        Already under way when returned (a future, not a coroutine), so shielding it costs
        no extra task.
        """
        ...

    async def close(self) -> None:
        """Flush and release the storage."""
        ...

    async def page(self, prefix: str, limit: int, after: str | None) -> tuple[list[SessionInfo], bool] | None:
        """Sessions whose key starts with ``prefix``, newest first, after the key ``after``;
        whether there are more. None when ``after`` is not such a session."""
        ...

    async def read(
        self, key: str, max_messages: int, max_bytes: int
    ) -> tuple[SessionInfo, list[ChatMessage], bool] | None:
        """A session's row and its newest whole turns (bounded); whether older ones were left out."""
        ...

    async def rename(self, key: str, title: str) -> SessionInfo | None:
        """Set an existing session's title; None when there is no such session."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove a session and its history; whether it existed."""
        ...


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
    """History per session key, cached in memory, persisted through a :class:`SessionBackend`.

    The cache is bounded by size (``cache_bytes``, roughly the text it holds) and by count:
    least recently used sessions are dropped first and reloaded from disk when next needed;
    a session larger than the whole bound is never cached.
    """

    def __init__(
        self,
        backend: SessionBackend,
        *,
        max_messages: int = 100,
        max_chars: int = 0,
        cache_size: int = 10_000,
        cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._backend = backend
        self._max = max_messages
        self._max_chars = max_chars
        self._cache_size = cache_size
        self._cache_limit = cache_bytes
        self._cache: OrderedDict[str, list[ChatMessage]] = OrderedDict()
        self._costs: dict[str, int] = {}  # key -> its cached messages' approximate size
        self._cache_bytes = 0
        self._known: set[str] = set()
        self._locks = KeyedLocks()

    def lock(self, key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with store.lock(key):`` holds ``key``'s turn lock: turns on one session never
        interleave (FIFO); nearly free when nobody waits (see :mod:`nanobot.keylock`)."""
        return self._locks(key)

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
        store._known = await backend.keys()
        return store

    @property
    def cache_bytes(self) -> int:
        """Approximate size of the histories held in memory (at most ``cache_bytes``)."""
        return self._cache_bytes

    async def close(self) -> None:
        """Flush pending writes and close the backend."""
        await self._backend.close()

    async def history(self, key: str) -> list[ChatMessage]:
        """The bounded history of ``key`` (a copy the caller may extend)."""
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

        The memory copy is updated first so the next turn on this session sees it; the
        commit is shielded: a turn that reached this point is complete even if its
        client goes away. If the commit fails, the memory copy is dropped and reloaded.
        """
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
        try:
            await asyncio.shield(committed)
        except sqlite3.Error as exc:
            self._forget(key)
            raise NanobotError(f"could not save the conversation: {exc}") from exc

    # -- sessions over HTTP: listing, reading, renaming, deleting (off the turn path)
    async def page(self, prefix: str, limit: int, after: str | None) -> tuple[list[SessionInfo], bool] | None:
        """Sessions whose key starts with ``prefix``, newest first (see :meth:`SessionBackend.page`)."""
        try:
            return await self._backend.page(prefix, limit, after)
        except sqlite3.Error as exc:
            raise StorageError(f"could not list the sessions: {exc}") from exc

    async def read(
        self, key: str, max_messages: int, max_bytes: int
    ) -> tuple[SessionInfo, list[ChatMessage], bool] | None:
        """The whole stored history of ``key`` (not only the model's window), bounded."""
        try:
            return await self._backend.read(key, max_messages, max_bytes)
        except sqlite3.Error as exc:
            raise StorageError(f"could not read the conversation: {exc}") from exc

    async def rename(self, key: str, title: str) -> SessionInfo | None:
        """Set the title of an existing session."""
        try:
            return await self._backend.rename(key, title)
        except sqlite3.Error as exc:
            raise StorageError(f"could not rename the conversation: {exc}") from exc

    async def delete(self, key: str) -> bool:
        """Forget ``key`` on disk and in memory; waits for a running turn (the turn lock), so it
        never interleaves with one, and the next turn starts fresh."""
        async with self.lock(key):
            # Shielded, and the memory copy dropped first: a client that goes away mid-way
            # cannot leave a cached history whose rows are gone (or the reverse).
            deleting = asyncio.ensure_future(self._backend.delete(key))
            self._forget(key)
            self._known.discard(key)
            try:
                return await asyncio.shield(deleting)
            except sqlite3.Error as exc:
                self._known.add(key)  # still on disk: the next turn reloads it
                raise NanobotError(f"could not delete the conversation: {exc}") from exc

    def _remember(self, key: str, messages: list[ChatMessage], cost: int) -> None:
        """Cache ``key`` as most recently used, then drop the least recently used over the bounds."""
        self._forget(key)
        if cost > self._cache_limit:
            return  # bigger than the whole cache: read from disk each time instead
        self._cache[key] = messages
        self._costs[key] = cost
        self._cache_bytes += cost
        while self._cache_bytes > self._cache_limit or len(self._cache) > self._cache_size:
            self._forget(next(iter(self._cache)))

    def _forget(self, key: str) -> None:
        if self._cache.pop(key, None) is not None:
            self._cache_bytes -= self._costs.pop(key)
