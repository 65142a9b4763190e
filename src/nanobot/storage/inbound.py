"""Inbound chat across processes: who receives a channel's updates, and which were taken already.

Telegram allows one ``getUpdates`` consumer per bot token and Discord one Gateway session per
shard, so with several processes on one PostgreSQL exactly one process *leads* each polling
channel (:mod:`nanobot.storage.postgres.leadership`: an advisory lock on a dedicated
connection); the others only send. Every update id is recorded before its update is handed to
the agent, so a new leader after a crash, or a webhook call Telegram retries, never starts a
second turn for the same update.

One process on the embedded SQLite files always leads (the workspace lock already makes it the
only one) and remembers recent ids in memory: no database, no cost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol

from nanobot.storage_config import StorageConfig

Work = Callable[[], Awaitable[None]]

RECENT_IDS = 10_000  # ids a single process remembers (a retried webhook call comes within minutes)


class ResumePoint(NamedTuple):
    """Where a Discord Gateway session stands: a new leader RESUMEs it (Discord replays what was
    sent since ``seq``) instead of identifying afresh, which would lose what arrived meanwhile."""

    session_id: str
    resume_url: str
    seq: int


class ChannelInbound(Protocol):
    """One channel's inbound side in this process: leadership and the record of update ids."""

    @property
    def shared(self) -> bool:
        """Whether other processes may lead the channel after this one."""
        ...

    @property
    def leading(self) -> bool:
        """Whether this process receives the channel's updates now."""
        ...

    async def lead(self, work: Work) -> None:
        """Run ``work`` whenever this process leads the channel: wait for the lead, run it, cancel
        it when the lead is lost, wait again. Returns when ``work`` returns."""
        ...

    async def fresh(self, ids: Sequence[str], resume: ResumePoint | None = None) -> list[str]:
        """Record ``ids`` as taken and return those never taken before, in order; with
        ``resume``, also where the channel's session stands (in the same write).

        Raises StorageError when they cannot be recorded: then none may be handed on yet.
        """
        ...

    async def resume_point(self) -> ResumePoint | None:
        """Where the last leader's session stood (None: none saved, or nothing to share)."""
        ...

    async def close(self) -> None:
        """Give up the lead and release connections; the object may be used again later."""
        ...


class SoloInbound:
    """The single process's inbound side: always the leader; recent ids kept in memory."""

    def __init__(self, remember: int = RECENT_IDS) -> None:
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    @property
    def shared(self) -> bool:
        """Never: no other process can share this workspace."""
        return False

    @property
    def leading(self) -> bool:
        """Always: no other process can share this workspace."""
        return True

    async def lead(self, work: Work) -> None:
        """Run ``work`` at once."""
        await work()

    async def fresh(self, ids: Sequence[str], resume: ResumePoint | None = None) -> list[str]:
        """The ids not among the last :data:`RECENT_IDS` seen, now remembered (``resume`` is not
        needed: this process's own Gateway client keeps its session)."""
        new = [i for i in dict.fromkeys(ids) if i not in self._recent]
        for update_id in new:
            self._recent[update_id] = None
        while len(self._recent) > self._remember:
            self._recent.popitem(last=False)
        return new

    async def resume_point(self) -> ResumePoint | None:
        """None: no other process ever held the session."""
        return None

    async def close(self) -> None:
        """Nothing to release (the ids stay remembered across a restart of the channel)."""


def open_inbound(storage: StorageConfig, channel: str, token: str) -> ChannelInbound:
    """The inbound side of ``channel`` (its bot ``token`` names it, as a digest) on ``storage``:
    shared through PostgreSQL, else this process alone. Connects lazily, when first used."""
    if not storage.is_postgres:
        return SoloInbound()
    # Imported here: asyncpg is only loaded by deployments that use it.
    from nanobot.storage.postgres.leadership import PgChannelInbound

    return PgChannelInbound(storage, channel, token)
