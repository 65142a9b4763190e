"""Turn leases in one process: the embedded SQLite file has one user (the workspace lock), so a
session's lease is an in-process FIFO lock (:mod:`nanobot.storage.keylock`), with no token and
no version: nothing else can write the session."""

from __future__ import annotations

from nanobot.storage.base import Lease
from nanobot.storage.keylock import KeyedLocks


class LocalTurnLeases(KeyedLocks):
    """:class:`~nanobot.storage.base.TurnLeases` for one process: ``hold`` is the keyed lock itself
    (one dict insert and delete per turn when nobody waits)."""

    __slots__ = ()

    hold = KeyedLocks.__call__

    @property
    def shared(self) -> bool:
        """Never: this process is the file's only user."""
        return False

    def current(self, key: str) -> Lease | None:
        """No tokens here: the lock is the whole fence."""
        return None

    async def close(self) -> None:
        """Nothing runs in the background."""
