"""Re-reads of the outbox while running: hand edits, late channels, other processes' work.

A re-read is asked for (:meth:`Rereads.request`, never blocking: requests coalesce) when
``nanobot outbox retry|drop`` changed the outbox (``SIGUSR1`` on SQLite, ``NOTIFY`` on
PostgreSQL), when a late channel came up, or when another process enqueued or gave up lanes.
It reads the pending messages this process may deliver and reconciles them with the lanes
(:func:`~nanobot.delivery.lifecycle.reconcile`): newly pending messages join their lanes, a
dropped one still in a lane is skipped, and messages already in a lane are never queued twice.
This class owns the re-read's state: the request, its lock, and the ids queued while it reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nanobot.delivery.lanes import Lanes
from nanobot.delivery.lifecycle import reconcile
from nanobot.storage.outbox import Outbox, OutboxEntry

log = logging.getLogger(__name__)


class Rereads:
    """Re-reads the outbox on request, one at a time."""

    def __init__(
        self,
        store: Outbox,
        lanes: Lanes,
        enqueue: Callable[[OutboxEntry], None],
        durable: Callable[[], frozenset[str]],
        held_max_age: float,
        on_change: Callable[[], None],
    ) -> None:
        self._store = store
        self._lanes = lanes
        self._enqueue = enqueue
        self._durable = durable
        self._held_max_age = held_max_age
        self._on_change = on_change
        self._wanted = asyncio.Event()
        self._lock = asyncio.Lock()
        self._seen: set[int] | None = None  # while a re-read reads: ids queued meanwhile

    @property
    def busy(self) -> bool:
        """True while a re-read is under way."""
        return self._seen is not None

    def use(self, store: Outbox) -> None:
        """Read ``store``."""
        self._store = store

    def request(self) -> None:
        """Ask for a re-read (for a signal handler: never blocks; requests coalesce)."""
        self._wanted.set()

    def queued(self, entry_id: int) -> None:
        """An entry was queued on a lane (by anyone): a re-read under way must not queue it again."""
        if self._seen is not None:
            self._seen.add(entry_id)

    async def run(self) -> None:
        """Re-read whenever asked, until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.reread()
            except Exception as exc:  # the storage failed: logged, and the next request tries again
                log.error("outbox: could not re-read the outbox: %s", exc)

    async def reread(self) -> None:
        """Queue what became pending, skip what was dropped, wake the lanes of retried heads."""
        async with self._lock:
            watched = self._lanes.queued_ids()  # each stored before the read: its row tells its fate
            self._seen = set()
            self._on_change()
            try:
                rows = await self._store.recover(self._durable(), self._held_max_age)
                queued = self._lanes.entries()
                edits = reconcile(rows, queued, watched, self._seen)
                for entry in edits.new:
                    self._enqueue(entry)
                self._lanes.drop(edits.dropped)
                self._lanes.wake([*edits.retried, *(queued[i] for i in edits.dropped)])
            finally:
                self._seen = None
                self._on_change()
        if edits.new or edits.dropped or edits.retried:
            log.info("outbox: re-read: %d to send, %d dropped, %d retried by hand",
                     len(edits.new), len(edits.dropped), len(edits.retried))  # fmt: skip
