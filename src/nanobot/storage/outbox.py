"""The outbox's contract: what is stored for every message to a chat platform, its states, and
the :class:`Outbox` Protocol the delivery side uses. Implementations:
:class:`~nanobot.storage.sqlite.outbox.OutboxStore` (the workspace's SQLite file, one process)
and :class:`~nanobot.storage.postgres.PgOutbox` (shared by many processes).

States::

    pending ──► delivered
       │  └───► failed      (a permanent error, or ``maxAttempts`` used up; last error kept)
       └──◄──► held         (its channel is not enabled; never sent while it stays disabled)
               held ──► expired   (older than ``heldMaxAgeSeconds`` when its channel comes back)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import orjson

DELIVERED_KEEP_SECONDS = 7 * 86400.0  # delivered rows are pruned at start after a week


class State(StrEnum):
    """Where an outbox entry is in its life."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    HELD = "held"
    EXPIRED = "expired"


@dataclass(slots=True)
class OutboxEntry:
    """One stored outbound message. Mutable: the delivery loop updates it, then saves it."""

    id: int
    uid: str  # random and stable: the seed of idempotency keys (Discord nonces)
    channel: str
    chat_id: str
    kind: str
    content: str
    metadata: dict[str, str] = field(default_factory=dict)
    state: State = State.PENDING
    attempts: int = 0
    parts_done: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    next_at: float = 0.0
    last_error: str = ""

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> OutboxEntry:
        """Build from a ``SELECT {_COLUMNS}`` row."""
        id_, uid, channel, chat_id, kind, content, meta, state, *progress = row
        metadata = orjson.loads(meta) if meta else {}
        return cls(id_, uid, channel, chat_id, kind, content, metadata, State(state), *progress)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store: where it goes, what it says, and whether its channel is enabled."""

    channel: str
    chat_id: str
    kind: str
    content: str
    metadata: dict[str, str]
    held: bool = False


class Outbox(Protocol):
    """What the delivery manager needs from outbox storage: :class:`OutboxStore` (SQLite, one
    process) or :class:`~nanobot.storage.postgres.PgOutbox` (shared by many processes; there
    ``recover`` returns only the pending entries of the chat lanes this process holds)."""

    @property
    def is_open(self) -> bool:
        """True between ``open`` and ``close``."""

    async def open(self) -> None:
        """Make the storage ready."""

    async def close(self) -> None:
        """Finish pending writes and release the storage."""

    async def add(self, messages: list[NewMessage]) -> list[OutboxEntry]:
        """Store new messages durably; returns them with their ids."""

    def save_soon(self, entry: OutboxEntry) -> asyncio.Future[None]:
        """Write back delivery progress without waiting for it."""

    async def recover(self, enabled: frozenset[str], held_max_age: float) -> list[OutboxEntry]:
        """Settle held and pending entries (at start, and at each re-read); return the pending
        ones this process delivers, oldest first."""

    async def pending_before(self, lanes: list[tuple[str, str]], before: int) -> list[OutboxEntry]:
        """The pending entries of these chat lanes (channel, chat_id) stored before id
        ``before``, oldest first: other processes' messages to chats this one delivers, which it
        may not have read yet (their NOTIFY still on its way). Empty where no other process
        stores messages (SQLite)."""

    async def counts(self) -> dict[str, int]:
        """Entries per state, ``delivered`` left out (for /metrics)."""
