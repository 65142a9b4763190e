"""Dispatches the agent's outbound messages to channels by name.

Non-durable channels (``api``) get them directly, with no awaits. Every other target goes
through the durable outbox (see ``outbox.py``): the message is committed first, then
delivered by its chat's *lane* — one task per ``(channel, chat_id)`` with work, so
messages to one chat arrive in order while chats do not wait for each other. A lane
sleeps until its head is due (backoff, or the server's ``retry_after``); nothing polls.
Messages for channels that are not enabled (or failed to start) are held, never sent.

Metadata the manager sets on each delivery attempt, for the channel's ``send``:
``delivery_id`` (random, stable across retries and restarts: seed idempotency keys from
it) and ``parts_done`` (parts of a split message already delivered by an earlier
attempt; ``send`` skips them, and updates the key as parts go out so a retry resumes).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from nanobot.bus import DeliveryReceipt, MessageBus, OutboundKind, OutboundMessage
from nanobot.channels.api import ApiChannel
from nanobot.channels.base import Channel
from nanobot.channels.discord import DiscordChannel
from nanobot.channels.outbox import NewMessage, Outbox, OutboxEntry, OutboxStore, State
from nanobot.channels.telegram import TelegramChannel
from nanobot.config import ChannelsConfig, Config
from nanobot.errors import ChannelError, ChannelPermanentError, ChannelRetryableError

log = logging.getLogger(__name__)

ChannelFactory = Callable[[Config, MessageBus], Channel | None]

# Each platform module builds its channel from the whole config (None when disabled): its
# own section, plus ``api``'s upload limits for the files users send. No channel names here.
CHANNEL_FACTORIES: tuple[ChannelFactory, ...] = (TelegramChannel.from_config, DiscordChannel.from_config)

APOLOGY = "Sorry, something went wrong while answering. Please try again in a moment."


def build_channel_manager(config: Config, bus: MessageBus, api: ApiChannel) -> ChannelManager:
    """Build the manager, its outbox (``<workspace>/outbox.db``) and every enabled channel."""
    candidates = [ch for make in CHANNEL_FACTORIES if (ch := make(config, bus)) is not None]
    store = OutboxStore(config.agents.defaults.workspace_path / "outbox.db")
    return ChannelManager(bus, api, candidates, store, config.channels)


def _resolve(msg: OutboundMessage | None, receipt: DeliveryReceipt) -> None:
    if msg is not None and msg.receipt is not None and not msg.receipt.done():
        msg.receipt.set_result(receipt)


class RetryPolicy:
    """Exponential backoff with jitter; a server's ``retry_after`` overrides it."""

    __slots__ = ("base", "cap", "max_attempts")

    def __init__(self, config: ChannelsConfig) -> None:
        self.base = config.retry_base_seconds  # set tiny in tests to make backoff instant
        self.cap = config.retry_max_seconds
        self.max_attempts = max(1, config.max_attempts)

    def delay(self, attempts: int, retry_after: float | None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        if retry_after is not None:
            return max(0.0, float(retry_after))
        backoff = min(self.cap, self.base * 2.0 ** (attempts - 1))
        return backoff * random.uniform(0.5, 1.0)


class ChannelManager:
    """Starts the enabled channels and dispatches outbound messages to them."""

    def __init__(
        self,
        bus: MessageBus,
        api: ApiChannel,
        channels: list[Channel],
        store: Outbox,
        config: ChannelsConfig,
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
        self._lanes: dict[tuple[str, str], deque[OutboxEntry]] = {}
        self._receipts: dict[int, OutboundMessage] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._committing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def enabled(self) -> frozenset[str]:
        """Names of the channels this process delivers to (the ones that started)."""
        return frozenset(self._channels)

    @property
    def store(self) -> Outbox:
        """The outbox behind the durable channels."""
        return self._store

    async def start(self) -> None:
        """Open the outbox, start every channel (one that fails stays down), resume pending work."""
        await self._store.open()
        await self._api.start()
        for channel in self._candidates:
            try:
                await channel.start()
            except ChannelError as exc:
                log.error("channel %s is down: %s", channel.name, exc)
                await channel.stop()
                continue
            self._channels[channel.name] = channel
        durable = frozenset(name for name, ch in self._channels.items() if ch.durable)
        pending = await self._store.recover(durable, self._config.held_max_age_seconds)
        if pending:
            log.info("outbox: resuming %d pending message(s)", len(pending))
        for entry in pending:
            self._enqueue(entry)
        self._spawn(self._take_in())

    async def stop(self) -> None:
        """Stop delivering (unfinished work stays pending in the outbox), stop channels, close."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._keep_leftovers()
        for name, channel in list(self._channels.items()):
            try:
                await channel.stop()
            except ChannelError as exc:
                log.warning("channel %s did not stop cleanly: %s", name, exc)
        await self._store.close()

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
            _resolve(
                msg, DeliveryReceipt("queued", "nanobot is shutting down; it will be sent after restart")
            )
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
            if msg.channel == self._api.name:
                self._to_api(msg)
            else:
                self.dispatch(msg)
        await self._idle.wait()

    def _check_idle(self) -> None:
        if not (self._intake or self._lanes or self._committing):
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
                log.info("outbox: message %d for %s held: channel not enabled", entry.id, entry.channel)
                _resolve(msg, DeliveryReceipt("queued", f"channel {entry.channel} is not enabled"))
                continue
            if not deliver:
                _resolve(
                    msg, DeliveryReceipt("queued", "nanobot is shutting down; it will be sent after restart")
                )
                continue
            if msg.receipt is not None:
                self._receipts[entry.id] = msg
            self._enqueue(entry)

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
        key = (entry.channel, entry.chat_id)
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(entry)
            return
        self._lanes[key] = deque([entry])
        self._idle.clear()
        self._spawn(self._drain(key))

    async def _drain(self, key: tuple[str, str]) -> None:
        """Deliver one chat's entries in order; the lane ends when it is empty."""
        lane = self._lanes[key]
        channel = self._channels[key[0]]
        try:
            while lane:
                entry = lane[0]
                delay = entry.next_at - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # sleep until due: backoff or the server's retry_after
                if await self._attempt(channel, entry):
                    lane.popleft()
        finally:
            del self._lanes[key]
            self._check_idle()

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
