"""Per-chat delivery lanes: committed outbox entries on their way to the platforms.

One *lane* per ``(channel, chat_id)`` with work, each a task of its own, so messages to one
chat arrive in order while chats do not wait for each other. A lane sleeps until its head
is due (backoff, or the server's ``retry_after``); nothing polls. :class:`Lanes` owns every
piece of lane state — what is queued, what was dropped by hand, which lanes nap, the
receipts still waiting for a first attempt, and the lane tasks — so the manager's intake
and its re-reads change lanes only through these methods.

Metadata set on each delivery attempt, for the channel's ``send``: ``delivery_id``
(random, stable across retries and restarts: seed idempotency keys from it) and
``parts_done`` (parts of a split message already delivered by an earlier attempt; ``send``
skips them, and updates the key as parts go out so a retry resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from nanobot.bus import DeliveryReceipt, OutboundKind, OutboundMessage
from nanobot.channels.base import Channel
from nanobot.delivery.lifecycle import RetryPolicy
from nanobot.delivery.ownership import LaneOwnership, OneProcess
from nanobot.errors import ChannelPermanentError, ChannelRetryableError
from nanobot.storage.outbox import Outbox, OutboxEntry, State

log = logging.getLogger(__name__)

ELSEWHERE = DeliveryReceipt("queued", "another nanobot process delivers to this chat")

Lane = tuple[str, str]  # (channel, chat_id)


def resolve(msg: OutboundMessage | None, receipt: DeliveryReceipt) -> None:
    """Tell whoever waits on ``msg``'s receipt (the ``message`` tool) what happened to it."""
    if msg is not None and msg.receipt is not None and not msg.receipt.done():
        msg.receipt.set_result(receipt)


class Lanes:
    """Delivers queued entries, in order per chat; retried with backoff, settled in the outbox."""

    def __init__(
        self,
        channels: Mapping[str, Channel],
        store: Outbox,
        policy: RetryPolicy,
        on_lane_end: Callable[[], None],
        ownership: LaneOwnership | None = None,
    ) -> None:
        self._channels = channels  # live: a channel that comes up late joins it
        self._store = store
        self._ownership: LaneOwnership = ownership or OneProcess()
        self._policy = policy
        self._on_lane_end = on_lane_end
        self._lanes: dict[Lane, deque[OutboxEntry]] = {}
        self._queued: set[int] = set()  # ids in some lane: never queued twice
        self._gone: set[int] = set()  # ids in a lane whose row was dropped by hand: skipped
        self._wakers: dict[Lane, asyncio.Event] = {}  # lanes waiting for their head to be due
        self._receipts: dict[int, OutboundMessage] = {}  # senders waiting for a first attempt
        self._saves: dict[Lane, asyncio.Future[None]] = {}  # each lane's last write-back
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def busy(self) -> bool:
        """True while some lane has work."""
        return bool(self._lanes)

    def use(self, store: Outbox, ownership: LaneOwnership) -> None:
        """Deliver through ``store`` and ``ownership`` (chosen by ``storage.url``; before any work)."""
        self._store, self._ownership = store, ownership

    def ahead(self, channel: str, chat_id: str) -> int:
        """How many entries wait (or are under way) in this chat's lane."""
        return len(self._lanes.get((channel, chat_id), ()))

    def queued_ids(self) -> set[int]:
        """A copy of the ids in some lane."""
        return set(self._queued)

    def entries(self) -> dict[int, OutboxEntry]:
        """Every entry in a lane, by id."""
        return {e.id: e for lane in self._lanes.values() for e in lane}

    def enqueue(self, entry: OutboxEntry, msg: OutboundMessage | None = None) -> bool:
        """Queue ``entry`` on its chat's lane (``msg``'s receipt learns its first attempt).

        False when it is already queued: an entry is never in a lane twice.
        """
        if entry.id in self._queued:
            return False
        self._queued.add(entry.id)
        if msg is not None and msg.receipt is not None:
            self._receipts[entry.id] = msg
        key = (entry.channel, entry.chat_id)
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(entry)
            return True
        self._lanes[key] = deque([entry])
        task = asyncio.create_task(self._drain(key))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return True

    def drop(self, ids: Iterable[int]) -> None:
        """Skip these queued entries (dropped by hand): never sent."""
        self._gone.update(ids)

    def wake(self, entries: Iterable[OutboxEntry]) -> None:
        """Wake the lanes of these entries, so they look at their head again now."""
        for entry in entries:
            if (waker := self._wakers.get((entry.channel, entry.chat_id))) is not None:
                waker.set()

    async def finish(self, grace: float) -> None:
        """Start no new attempt; wait (up to ``grace`` seconds) for the attempts under way."""
        self._stopping = True
        for waker in self._wakers.values():  # napping lanes wake, see the stop, and end
            waker.set()
        if not self._tasks:
            return
        _done, late = await asyncio.wait(list(self._tasks), timeout=grace)
        if late:
            log.warning("outbox: %d send(s) still under way after %.1fs: cut short, retried after restart",
                        len(late), grace)  # fmt: skip

    async def cancel(self, receipt: DeliveryReceipt) -> None:
        """End every lane now (unfinished work stays pending); waiting senders get ``receipt``."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for msg in self._receipts.values():
            resolve(msg, receipt)
        self._receipts.clear()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("outbox lane %s crashed", task.get_name(), exc_info=task.exception())

    async def _drain(self, key: Lane) -> None:
        """Deliver one chat's entries in order; the lane ends when it is empty (or on stop)."""
        lane = self._lanes[key]
        channel = self._channels[key[0]]
        try:
            while lane and not self._stopping:
                entry = lane[0]
                if entry.id in self._gone:
                    log.info("outbox: message %d was dropped by hand; not sending it", entry.id)
                    resolve(self._receipts.pop(entry.id, None), DeliveryReceipt("failed", "dropped"))
                    self._pop(lane)
                    continue
                if not self._ownership.holds(*key):  # its lease ran out: another process takes over
                    self._abandon(lane)
                    break
                delay = max(entry.next_at - time.time(), self._ownership.held_for(key[0]))
                if delay > 0:
                    await self._nap(key, delay)  # then look again: the head may be gone, or due sooner
                    continue
                settled = await self._attempt(channel, entry)
                # The attempt's result is stored before the next attempt starts (and before the
                # entry leaves the lane, so a re-read meanwhile never queues it again): after a
                # crash, only the message under way can be sent twice.
                if (saving := self._saves.pop(key, None)) is not None:
                    await asyncio.wait([saving])  # (a failed write is logged by save_soon)
                if settled:
                    self._pop(lane)
        finally:
            del self._lanes[key]
            self._saves.pop(key, None)
            self._on_lane_end()

    def _abandon(self, lane: deque[OutboxEntry]) -> None:
        """Leave the lane's entries to the process that now holds it (they stay pending)."""
        while lane:
            entry = lane[0]
            resolve(self._receipts.pop(entry.id, None), ELSEWHERE)
            self._pop(lane)

    def _pop(self, lane: deque[OutboxEntry]) -> None:
        entry = lane.popleft()
        self._queued.discard(entry.id)
        self._gone.discard(entry.id)

    async def _nap(self, key: Lane, delay: float) -> None:
        """Sleep until the lane's head is due (backoff, or the server's retry_after), or a reload wakes it."""
        waker = self._wakers[key] = asyncio.Event()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await waker.wait()
        finally:
            del self._wakers[key]

    async def _attempt(self, channel: Channel, entry: OutboxEntry) -> bool:
        """One delivery attempt; True when the entry is settled (delivered or failed)."""
        metadata = {**entry.metadata, "delivery_id": entry.uid, "parts_done": str(entry.parts_done)}
        msg = OutboundMessage(entry.channel, entry.chat_id, entry.content, OutboundKind(entry.kind),
                              metadata=metadata)  # fmt: skip
        entry.attempts += 1
        try:
            await channel.send(msg)
        except asyncio.CancelledError:
            raise
        except ChannelPermanentError as exc:
            return self._settle(entry, State.FAILED, str(exc))
        except ChannelRetryableError as exc:
            return self._retry(entry, msg, str(exc), exc.retry_after)
        except Exception as exc:  # a bug in a channel: retried with backoff, then failed
            log.exception("channel %s raised an unexpected error", entry.channel)
            return self._retry(entry, msg, f"{type(exc).__name__}: {exc}", None)
        return self._settle(entry, State.DELIVERED, "")

    def _retry(self, entry: OutboxEntry, msg: OutboundMessage, error: str, retry_after: float | None) -> bool:
        entry.parts_done = int(msg.metadata.get("parts_done", entry.parts_done))
        if entry.attempts >= self._policy.max_attempts:
            return self._settle(entry, State.FAILED, f"gave up after {entry.attempts} attempts: {error}")
        now = time.time()
        delay = self._policy.delay(entry.attempts, retry_after)
        entry.next_at = now + delay
        entry.updated_at = now
        entry.last_error = error
        self._saves[(entry.channel, entry.chat_id)] = self._store.save_soon(entry)
        if retry_after is not None:  # the platform's limit: every process holds back, not only this lane
            self._ownership.hold(entry.channel, delay)
        log.info("outbox: message %d to %s will retry in %.2fs: %s", entry.id, entry.channel,
                 delay, error)  # fmt: skip
        detail = f"will retry in {delay:.3g} s: {error}"
        resolve(self._receipts.pop(entry.id, None), DeliveryReceipt("queued", detail))
        return False

    def _settle(self, entry: OutboxEntry, state: State, error: str) -> bool:
        entry.state = state
        entry.updated_at = time.time()
        entry.last_error = error or entry.last_error
        self._saves[(entry.channel, entry.chat_id)] = self._store.save_soon(entry)
        if state == State.FAILED:
            log.warning("outbox: message %d to %s failed: %s", entry.id, entry.channel, error)
            receipt = DeliveryReceipt("failed", error)
        else:
            receipt = DeliveryReceipt("sent")
        resolve(self._receipts.pop(entry.id, None), receipt)
        return True
