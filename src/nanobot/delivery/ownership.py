"""Who may deliver which chat's lane, and platform rate limits shared between processes.

One process (SQLite, the embedded default) delivers every lane itself: :class:`OneProcess`.
Several processes on one PostgreSQL each deliver the lanes they have claimed, and share a
platform's ``Retry-After`` so that a 429 seen by one holds the channel for all
(:class:`nanobot.storage.postgres.outbox.PgOutbox`). The lanes and the manager ask only this
Protocol, never which backend is behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class LaneOwnership(Protocol):
    """What the lanes ask before each attempt, and what they report after a rate limit."""

    async def start(self, wake: Callable[[], None]) -> None:
        """Begin watching: ``wake`` is called when the outbox changed elsewhere (re-read it)."""

    async def stop(self) -> None:
        """Give up every lane (others take them over at once) and stop watching."""

    def holds(self, channel: str, chat_id: str) -> bool:
        """Whether this process may deliver to this chat now."""

    def held_for(self, channel: str) -> float:
        """Seconds a platform rate limit shared by every process still holds ``channel`` (0: none)."""

    def hold(self, channel: str, seconds: float) -> None:
        """A platform said ``Retry-After: seconds`` on ``channel``: tell the other processes."""


class OneProcess:
    """The embedded default: this process delivers every lane; a 429 holds only its own chat."""

    async def start(self, wake: Callable[[], None]) -> None:
        """Nothing to watch: only this process writes the outbox (``nanobot outbox`` signals)."""

    async def stop(self) -> None:
        """Nothing to give up."""

    def holds(self, channel: str, chat_id: str) -> bool:
        """Always: every lane is this process's."""
        return True

    def held_for(self, channel: str) -> float:
        """Never: the chat's own retry (its ``next_at``) carries the platform's wait."""
        return 0.0

    def hold(self, channel: str, seconds: float) -> None:
        """Nobody else to tell."""
