"""The storage contracts callers use, whatever the engine: session history and turn leases.

Two implementations of each: the embedded SQLite file under the workspace (one process,
:mod:`nanobot.storage.sqlite`) and PostgreSQL shared by any number of processes
(:mod:`nanobot.storage.postgres`). Every failure of the engine reaches callers as a
:class:`~nanobot.errors.StorageError`, never as a driver's exception.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from nanobot.errors import StorageError

ChatMessage = dict[str, Any]  # one message in OpenAI chat format (JSON-shaped by nature)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What is known about one session without reading its history."""

    key: str
    title: str
    created: float
    updated: float
    turns: int
    preview: str


@contextlib.contextmanager
def damaged_data() -> Iterator[None]:
    """A stored turn that is not JSON (damaged, or written by something else) as a StorageError."""
    try:
        yield
    except ValueError as exc:
        raise StorageError(f"damaged data in the session database ({type(exc).__name__}: {exc})") from exc


class NewestTurns:
    """The newest whole turns of a session, read newest first: at most ``max_messages`` messages
    and about ``max_bytes`` of stored JSON, the newest turn always (both engines' ``read``)."""

    __slots__ = ("_count", "_max_bytes", "_max_messages", "_size", "_turns", "truncated")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._turns: list[list[ChatMessage]] = []
        self._count = self._size = 0
        self._max_messages, self._max_bytes = max_messages, max_bytes
        self.truncated = False  # whether older turns were left out

    def take(self, data: bytes) -> bool:
        """Add the next older turn (its stored JSON); False when it does not fit (stop reading)."""
        messages: list[ChatMessage] = orjson.loads(data)
        if self._turns and (
            self._count + len(messages) > self._max_messages or self._size + len(data) > self._max_bytes
        ):
            self.truncated = True
            return False
        self._turns.append(messages)
        self._count += len(messages)
        self._size += len(data)
        return True

    def messages(self) -> list[ChatMessage]:
        """The turns taken, oldest first, as one list of messages."""
        return [m for turn in reversed(self._turns) for m in turn]


def no_nul(text: str) -> str:
    """``text`` without U+0000: PostgreSQL text cannot hold it and no platform shows it (dropped
    before storing, on both backends, so that they store the same)."""
    return text.replace("\x00", "") if "\x00" in text else text


class Lease:
    """A session's turn lease as its holder knows it (shared storage only).

    ``token`` fences the turn's write: a holder that stalled past its lease holds a token that
    no longer matches. ``version`` is the session's newest turn id when the lease was taken (None:
    no turns): the in-memory history is used only while it matches. ``write`` is the turn's write
    once it was handed to storage: that write also gives the lease back (one round trip for both),
    so leaving the turn gives it back only if the write failed.
    """

    __slots__ = ("key", "token", "version", "write")

    def __init__(self, key: str, token: int, version: int | None) -> None:
        self.key = key
        self.token = token
        self.version = version
        self.write: asyncio.Future[int | None] | None = None


class SessionBackend(Protocol):
    """Where history is kept: the SQLite file, or a database shared by many processes."""

    async def keys(self) -> set[str]:
        """Every session key that has history."""
        ...

    async def load(self, key: str, limit: int) -> list[ChatMessage]:
        """At least the last ``limit`` messages of a session (whole turns), oldest first."""
        ...

    def append(
        self, key: str, messages: Sequence[ChatMessage], lease: Lease | None = None
    ) -> Awaitable[int | None]:
        """Durably add one turn's messages to a session; resolves, once committed, to the
        session's new version (None where the engine keeps none).

        Already under way when returned (a future, not a coroutine), so shielding it costs
        no extra task. With ``lease`` (shared storage) the turn is written only while that
        lease still holds the session, and the same write gives the lease back.
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


class TurnLeases(Protocol):
    """One turn per session at a time: in this process (SQLite), or across processes (PostgreSQL)."""

    @property
    def shared(self) -> bool:
        """Whether other processes write the same sessions (the history cache then checks
        each session's version under its lease)."""
        ...

    def hold(self, key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with leases.hold(key):`` holds ``key``'s turn lease for the block; turns on one
        session run one at a time, in the order they arrived (within a process)."""
        ...

    def current(self, key: str) -> Lease | None:
        """The lease the running turn holds on ``key`` (None outside one, or where there are no
        tokens)."""
        ...

    async def close(self) -> None:
        """Stop whatever the leases run in the background."""
        ...
