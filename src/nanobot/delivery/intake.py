"""The intake: platform messages on their way into the outbox.

The bus hands each message over without waiting (:meth:`Intake.put`); one task commits what
has gathered in one batch (:meth:`Intake.run`), then hands each committed entry to its chat's
lane, or tells its sender why it waits: its channel is not enabled (held), an earlier message
to the chat is still under way, or another process delivers to that chat. The intake owns the
messages not yet committed, and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Set

from nanobot.bus import DeliveryReceipt, OutboundKind, OutboundMessage
from nanobot.channels.base import Channel
from nanobot.delivery.lanes import ELSEWHERE, Lanes, resolve
from nanobot.delivery.ownership import LaneOwnership
from nanobot.storage.base import no_nul
from nanobot.storage.outbox import NewMessage, Outbox, OutboxEntry, State

log = logging.getLogger(__name__)

SHUTTING_DOWN = DeliveryReceipt("queued", "nanobot is shutting down; it will be sent after restart")
APOLOGY = "Sorry, something went wrong while answering. Please try again in a moment."

Enqueue = Callable[[OutboxEntry, OutboundMessage | None], None]


class Intake:
    """Commits platform messages in batches, then queues them on their lanes."""

    def __init__(
        self,
        store: Outbox,
        ownership: LaneOwnership,
        lanes: Lanes,
        channels: Mapping[str, Channel],
        starting: Set[str],
        enqueue: Enqueue,
        on_change: Callable[[], None],
    ) -> None:
        self._store = store
        self._ownership = ownership
        self._lanes = lanes
        self._channels = channels  # live: the channels this process delivers to now
        self._starting = starting  # live: the ones still trying to start
        self._enqueue = enqueue
        self._on_change = on_change
        self._waiting: list[OutboundMessage] = []
        self._ready = asyncio.Event()
        self._committing = False

    @property
    def busy(self) -> bool:
        """True while messages wait to be committed, or are being committed."""
        return bool(self._waiting) or self._committing

    def use(self, store: Outbox, ownership: LaneOwnership) -> None:
        """Commit into ``store``; ``ownership`` says which chats this process delivers."""
        self._store, self._ownership = store, ownership

    def put(self, msg: OutboundMessage) -> None:
        """Take ``msg`` (never blocks: the intake task commits it)."""
        self._waiting.append(msg)
        self._ready.set()

    def take(self) -> list[OutboundMessage]:
        """Everything taken in but not yet committed (at shutdown)."""
        waiting, self._waiting = self._waiting, []
        return waiting

    async def run(self) -> None:
        """Commit what gathered, batch after batch, until cancelled."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._waiting = self._waiting, []
            if not batch:
                continue
            self._committing = True
            try:
                await self.commit(batch)
            finally:
                self._committing = False
                self._on_change()

    async def commit(self, batch: list[OutboundMessage], deliver: bool = True) -> None:
        """Store ``batch``; queue each entry on its lane (``deliver``: else only stored)."""
        news = [self._new(msg) for msg in batch]
        try:
            entries = await self._store.add(news)
        except Exception as exc:  # the disk failed: every sender learns it, nothing is sent uncommitted
            log.error("outbox: could not store %d message(s): %s", len(batch), exc)
            for msg in batch:
                resolve(msg, DeliveryReceipt("failed", f"could not store the message: {exc}"))
            return
        if deliver:
            await self._queue_earlier(entries)
        for entry, msg in zip(entries, batch, strict=True):
            self._hand_over(entry, msg, deliver)

    async def _queue_earlier(self, entries: list[OutboxEntry]) -> None:
        """Queue first what other processes stored earlier for the chats of ``entries`` that this
        one delivers: their NOTIFY may not have come yet, and this process's own later message
        must not overtake them (a lane never holds an entry twice)."""
        holds = self._ownership.holds
        mine = sorted({(e.channel, e.chat_id) for e in entries
                       if e.state == State.PENDING and holds(e.channel, e.chat_id)})  # fmt: skip
        if not mine:
            return
        try:
            earlier = await self._store.pending_before(mine, min(e.id for e in entries))
        except Exception as exc:  # (the storage failed: the next re-read finds them, maybe later)
            log.warning("outbox: could not read earlier messages of %d chat(s): %s", len(mine), exc)
            return
        for entry in earlier:
            self._enqueue(entry, None)

    def _new(self, msg: OutboundMessage) -> NewMessage:
        content = APOLOGY if msg.kind == OutboundKind.ERROR else msg.content
        held = msg.channel not in self._channels
        # No platform shows U+0000, and PostgreSQL text cannot hold it: dropped on every backend.
        meta = {no_nul(k): no_nul(v) for k, v in msg.metadata.items()}
        return NewMessage(msg.channel, no_nul(msg.chat_id), str(msg.kind), no_nul(content), meta, held)

    def _hand_over(self, entry: OutboxEntry, msg: OutboundMessage, deliver: bool) -> None:
        if entry.state == State.HELD:
            why = "is not reachable yet" if entry.channel in self._starting else "is not enabled"
            log.info("outbox: message %d for %s held: channel %s", entry.id, entry.channel, why)
            resolve(msg, DeliveryReceipt("queued", f"channel {entry.channel} {why}"))
        elif not deliver:
            resolve(msg, SHUTTING_DOWN)
        elif not self._ownership.holds(entry.channel, entry.chat_id):
            resolve(msg, ELSEWHERE)  # committed; the process holding that chat's lane sends it
        elif ahead := self._lanes.ahead(entry.channel, entry.chat_id):
            # Its first attempt waits for theirs (maybe retrying for long): say so now.
            plural = "s" if ahead > 1 else ""
            resolve(msg, DeliveryReceipt("queued", f"behind {ahead} earlier message{plural} to this chat"))
            self._enqueue(entry, None)
        else:
            self._enqueue(entry, msg)

