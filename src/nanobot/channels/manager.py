"""Dispatches the agent's outbound messages to channels by name.

Non-durable channels (``api``) get them directly, with no awaits. Every other target goes
through the durable outbox (see ``outbox.py``): the message is committed first, then
delivered by its chat's *lane* — one task per ``(channel, chat_id)`` with work, so
messages to one chat arrive in order while chats do not wait for each other. A lane
sleeps until its head is due (backoff, or the server's ``retry_after``); nothing polls.
Messages for channels that are not enabled (or refused at start) are held, never sent.
A channel whose platform was unreachable at start keeps trying in the background (see
``lifecycle.py``); its messages are held meanwhile, and go out once it is up.

:meth:`ChannelManager.reload` re-reads the outbox after a hand edit (``nanobot outbox
retry|drop``, announced by ``SIGUSR1``): newly pending messages join their lanes, a
dropped one still in a lane is skipped, and messages already in a lane are never queued twice.

Metadata the manager sets on each delivery attempt, for the channel's ``send``:
``delivery_id`` (random, stable across retries and restarts: seed idempotency keys from
it) and ``parts_done`` (parts of a split message already delivered by an earlier
attempt; ``send`` skips them, and updates the key as parts go out so a retry resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from nanobot.bus import DeliveryReceipt, MessageBus, OutboundKind, OutboundMessage
from nanobot.channels.api import ApiChannel
from nanobot.channels.base import Channel
from nanobot.channels.discord import DiscordChannel
from nanobot.channels.lifecycle import RetryPolicy, keep_starting, reconcile, try_start
from nanobot.channels.outbox import NewMessage, Outbox, OutboxEntry, OutboxStore, State
from nanobot.channels.telegram import TelegramChannel
from nanobot.config import ChannelsConfig, Config
from nanobot.errors import ChannelError, ChannelPermanentError, ChannelRetryableError

log = logging.getLogger(__name__)

Lane = tuple[str, str]  # (channel, chat_id)

ChannelFactory = Callable[[Config, MessageBus], Channel | None]

# Each platform module builds its channel from the whole config (None when disabled): its
# own section, plus ``api``'s upload limits for the files users send. No channel names here.
CHANNEL_FACTORIES: tuple[ChannelFactory, ...] = (TelegramChannel.from_config, DiscordChannel.from_config)

SHUTTING_DOWN = DeliveryReceipt("queued", "nanobot is shutting down; it will be sent after restart")
APOLOGY = "Sorry, something went wrong while answering. Please try again in a moment."


def build_channel_manager(config: Config, bus: MessageBus, api: ApiChannel) -> ChannelManager:
    """Build the manager, its outbox (``<workspace>/outbox.db``) and every enabled channel."""
    candidates = [ch for make in CHANNEL_FACTORIES if (ch := make(config, bus)) is not None]
    store = OutboxStore(config.agents.defaults.workspace_path / "outbox.db")
    return ChannelManager(bus, api, candidates, store, config.channels, grace=config.api.shutdown_grace)


def _resolve(msg: OutboundMessage | None, receipt: DeliveryReceipt) -> None:
    if msg is not None and msg.receipt is not None and not msg.receipt.done():
        msg.receipt.set_result(receipt)


class ChannelManager:
    """Starts the enabled channels and dispatches outbound messages to them."""

    def __init__(
        self,
        bus: MessageBus,
        api: ApiChannel,
        channels: list[Channel],
        store: Outbox,
        config: ChannelsConfig,
        *,
        grace: float = 10.0,
    ) -> None:
        self._bus = bus
        self._api = api
        self._candidates = channels
        self._channels: dict[str, Channel] = {api.name: api}
        self._store = store
        self._config = config
        self._policy = RetryPolicy(config)
        self._intake: list[OutboundMessage] = []
        self._intake_ready = asyncio.Event()
        self._lanes: dict[Lane, deque[OutboxEntry]] = {}
        self._queued: set[int] = set()  # ids in some lane: never queued twice
        self._gone: set[int] = set()  # ids in a lane whose row was dropped by hand: skipped
        self._wakers: dict[Lane, asyncio.Event] = {}  # lanes waiting for their head to be due
        self._starting: set[str] = set()  # channels unreachable at start, retrying in the background
        self._reload_wanted = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reloaded: set[int] | None = None  # while a reload reads: ids queued meanwhile
        self._receipts: dict[int, OutboundMessage] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lane_tasks: set[asyncio.Task[None]] = set()  # a subset of _tasks: what stop() lets finish
        self._grace = grace  # how long stop() waits for sends under way
        self._stopping = False
        self._committing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def enabled(self) -> frozenset[str]:
        """Names of the channels this process delivers to (the ones that started)."""
        return frozenset(self._channels)

    @property
    def starting(self) -> frozenset[str]:
        """Channels unreachable at start that are still trying, in the background."""
        return frozenset(self._starting)

    @property
    def store(self) -> Outbox:
        """The outbox behind the durable channels."""
        return self._store

    async def start(self) -> None:
        """Open the outbox, start the channels (refused: down; unreachable: retried), resume work."""
        await self._store.open()
        await self._api.start()
        for channel in self._candidates:
            try:
                error = await try_start(channel)
            except ChannelError as exc:
                log.error("channel %s is down: %s", channel.name, exc)
                continue
            if error is None:
                self._channels[channel.name] = channel
                continue
            self._starting.add(channel.name)
            self._spawn(keep_starting(channel, error, self._policy, self._channel_up))
        pending = await self._store.recover(self._durable(), self._config.held_max_age_seconds)
        if pending:
            log.info("outbox: resuming %d pending message(s)", len(pending))
        for entry in pending:
            self._enqueue(entry)
        self._spawn(self._take_in())
        self._spawn(self._reload_on_request())

    async def stop(self) -> None:
        """Stop delivering, stop channels, close the outbox.

        A send already under way is let finish (within the grace) and its result recorded: one
        cut short after the platform took it would be sent again after the restart. What is not
        yet under way stays pending in the outbox.
        """
        await self._finish_sends()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._keep_leftovers()
        # Every candidate, not only the started ones: a retried start may have been cut short.
        for channel in [self._api, *self._candidates]:
            try:
                await channel.stop()
            except ChannelError as exc:
                log.warning("channel %s did not stop cleanly: %s", channel.name, exc)
        await self._store.close()

    async def _finish_sends(self) -> None:
        """Start no new attempt; wait (up to the grace) for the lanes' attempts under way."""
        self._stopping = True
        for waker in self._wakers.values():  # napping lanes wake, see the stop, and end
            waker.set()
        lanes = list(self._lane_tasks)
        if not lanes:
            return
        _done, late = await asyncio.wait(lanes, timeout=self._grace)
        if late:
            log.warning("outbox: %d send(s) still under way after %.1fs: cut short, retried after restart",
                        len(late), self._grace)  # fmt: skip

    def _durable(self) -> frozenset[str]:
        return frozenset(name for name, ch in self._channels.items() if ch.durable)

    def _channel_up(self, channel: Channel) -> None:
        """A late channel is up: deliver to it, and release what was held for it."""
        self._starting.discard(channel.name)
        self._channels[channel.name] = channel
        self.request_reload()

    async def _keep_leftovers(self) -> None:
        """Commit what was taken in but not yet stored, so a clean shutdown loses nothing."""
        leftovers = self._intake + [
            m
            for m in self._bus.drain_outbound()
            if m.channel != self._api.name and m.kind != OutboundKind.DELTA
        ]
        self._intake = []
        if leftovers and self._store.is_open:
            await self._commit(leftovers, deliver=False)
        for msg in self._receipts.values():
            _resolve(msg, SHUTTING_DOWN)
        self._receipts.clear()

    async def run(self) -> None:
        """Dispatch outbound messages until cancelled.

        The bus calls :meth:`route` as each message is published (never awaiting: the api
        channel's queue and the outbox intake both take a message without blocking).
        """
        self._bus.attach_outbound(self.route)
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._bus.attach_outbound(None)

    def route(self, msg: OutboundMessage) -> None:
        """Send ``msg`` on its way: straight to a waiting HTTP response, or into the outbox."""
        if msg.channel == self._api.name:
            self._to_api(msg)  # the hot path
        else:
            self.dispatch(msg)

    def _to_api(self, msg: OutboundMessage) -> None:
        if self._api.deliver_nowait(msg):
            _resolve(msg, DeliveryReceipt("sent"))
        else:
            detail = f"no open request on api:{msg.chat_id}; the api channel only answers the current request"
            _resolve(msg, DeliveryReceipt("failed", detail))

    def dispatch(self, msg: OutboundMessage) -> None:
        """Hand one platform message to the outbox (never awaits: the intake task commits it)."""
        if msg.kind == OutboundKind.DELTA:
            return  # streaming pieces are for the API only; the REPLY carries the full text
        self._intake.append(msg)
        self._intake_ready.set()
        self._idle.clear()

    async def wait_idle(self) -> None:
        """Take in what the bus holds, then wait until every message is delivered, failed or held."""
        for msg in self._bus.drain_outbound():
            self.route(msg)
        await self._idle.wait()

    def _check_idle(self) -> None:
        if not (self._intake or self._lanes or self._committing or self._reloaded is not None):
            self._idle.set()

    # ----------------------------------------------------------------------- intake

    async def _take_in(self) -> None:
        """Commit queued messages in batches, then hand them to their lanes."""
        while True:
            await self._intake_ready.wait()
            self._intake_ready.clear()
            batch, self._intake = self._intake, []
            if not batch:
                continue
            self._committing = True
            try:
                await self._commit(batch)
            finally:
                self._committing = False
                self._check_idle()

    async def _commit(self, batch: list[OutboundMessage], deliver: bool = True) -> None:
        news = []
        for msg in batch:
            content = APOLOGY if msg.kind == OutboundKind.ERROR else msg.content
            held = msg.channel not in self._channels
            meta = dict(msg.metadata)
            news.append(NewMessage(msg.channel, msg.chat_id, str(msg.kind), content, meta, held))
        try:
            entries = await self._store.add(news)
        except Exception as exc:  # the disk failed: every sender learns it, nothing is sent uncommitted
            log.error("outbox: could not store %d message(s): %s", len(batch), exc)
            for msg in batch:
                _resolve(msg, DeliveryReceipt("failed", f"could not store the message: {exc}"))
            return
        for entry, msg in zip(entries, batch, strict=True):
            if entry.state == State.HELD:
                why = "is not reachable yet" if entry.channel in self._starting else "is not enabled"
                log.info("outbox: message %d for %s held: channel %s", entry.id, entry.channel, why)
                _resolve(msg, DeliveryReceipt("queued", f"channel {entry.channel} {why}"))
                continue
            if not deliver:
                _resolve(msg, SHUTTING_DOWN)
                continue
            ahead = len(self._lanes.get((entry.channel, entry.chat_id), ()))
            if ahead:  # its first attempt waits for theirs (maybe retrying for long): say so now
                plural = "s" if ahead > 1 else ""
                why = f"behind {ahead} earlier message{plural} to this chat"
                _resolve(msg, DeliveryReceipt("queued", why))
            elif msg.receipt is not None:
                self._receipts[entry.id] = msg
            self._enqueue(entry)

    # ----------------------------------------------------------------------- hand edits

    def request_reload(self) -> None:
        """Ask for a :meth:`reload` (for a signal handler: never blocks; requests coalesce)."""
        self._reload_wanted.set()

    async def _reload_on_request(self) -> None:
        """Re-read the outbox whenever asked (a signal arrived, or a late channel came up)."""
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            try:
                await self.reload()
            except Exception as exc:  # the disk failed: logged, and the next request tries again
                log.error("outbox: could not re-read the outbox: %s", exc)

    async def reload(self) -> None:
        """Re-read the outbox: queue what became pending, skip what was dropped, wake retried heads."""
        async with self._reload_lock:
            watched = set(self._queued)  # each in the file before the read: its row tells its fate
            self._reloaded = set()
            self._idle.clear()
            try:
                rows = await self._store.recover(self._durable(), self._config.held_max_age_seconds)
                queued = {e.id: e for lane in self._lanes.values() for e in lane}
                edits = reconcile(rows, queued, watched, self._reloaded)
                for entry in edits.new:
                    self._enqueue(entry)
                self._gone.update(edits.dropped)
                for entry in [*edits.retried, *(queued[i] for i in edits.dropped)]:
                    if (waker := self._wakers.get((entry.channel, entry.chat_id))) is not None:
                        waker.set()
            finally:
                self._reloaded = None
                self._check_idle()
        if edits.new or edits.dropped or edits.retried:
            log.info("outbox: re-read: %d to send, %d dropped, %d retried by hand",
                     len(edits.new), len(edits.dropped), len(edits.retried))  # fmt: skip

    # ----------------------------------------------------------------------- lanes

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("channel manager task %s crashed", task.get_name(), exc_info=task.exception())

    def _enqueue(self, entry: OutboxEntry) -> None:
        if entry.id in self._queued:
            return  # already on its way
        self._queued.add(entry.id)
        if self._reloaded is not None:
            self._reloaded.add(entry.id)
        key = (entry.channel, entry.chat_id)
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(entry)
            return
        self._lanes[key] = deque([entry])
        self._idle.clear()
        task = self._spawn(self._drain(key))
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)

    async def _drain(self, key: Lane) -> None:
        """Deliver one chat's entries in order; the lane ends when it is empty."""
        lane = self._lanes[key]
        channel = self._channels[key[0]]
        try:
            while lane and not self._stopping:
                entry = lane[0]
                if entry.id in self._gone:
                    log.info("outbox: message %d was dropped by hand; not sending it", entry.id)
                    _resolve(self._receipts.pop(entry.id, None), DeliveryReceipt("failed", "dropped"))
                    self._pop(lane)
                    continue
                delay = entry.next_at - time.time()
                if delay > 0:
                    await self._nap(key, delay)  # then look again: the head may be gone, or due sooner
                    continue
                if await self._attempt(channel, entry):
                    self._pop(lane)
        finally:
            del self._lanes[key]
            self._check_idle()

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
        entry.next_at = now + self._policy.delay(entry.attempts, retry_after)
        entry.updated_at = now
        entry.last_error = error
        self._store.save_soon(entry)
        log.info("outbox: message %d to %s will retry in %.2fs: %s", entry.id, entry.channel,
                 entry.next_at - now, error)  # fmt: skip
        _resolve(self._receipts.pop(entry.id, None), DeliveryReceipt("queued", f"will retry: {error}"))
        return False

    def _settle(self, entry: OutboxEntry, state: State, error: str) -> bool:
        entry.state = state
        entry.updated_at = time.time()
        entry.last_error = error or entry.last_error
        self._store.save_soon(entry)
        if state == State.FAILED:
            log.warning("outbox: message %d to %s failed: %s", entry.id, entry.channel, error)
            receipt = DeliveryReceipt("failed", error)
        else:
            receipt = DeliveryReceipt("sent")
        _resolve(self._receipts.pop(entry.id, None), receipt)
        return True
