"""Dispatches the agent's outbound messages to channels by name.

Non-durable channels (``api``) get them directly, with no awaits. Every other target goes
through the durable outbox (see ``outbox.py``): the message is committed first (the
*intake*, owned here), then delivered by its chat's *lane* (see ``lanes.py``), in order
per chat. Messages for channels that are not enabled (or refused at start) are held, never sent.
A channel whose platform was unreachable at start keeps trying in the background (see
``lifecycle.py``); its messages are held meanwhile, and go out once it is up.

:meth:`ChannelManager.reload` re-reads the outbox after a hand edit (``nanobot outbox
retry|drop``, announced by ``SIGUSR1``): newly pending messages join their lanes, a
dropped one still in a lane is skipped, and messages already in a lane are never queued twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from nanobot.bus import DeliveryReceipt, MessageBus, OutboundKind, OutboundMessage
from nanobot.channels.api import ApiChannel
from nanobot.channels.base import Channel
from nanobot.channels.discord import DiscordChannel
from nanobot.channels.telegram import TelegramChannel
from nanobot.config import ChannelsConfig, Config
from nanobot.delivery.lanes import ELSEWHERE, Lanes, resolve
from nanobot.delivery.lifecycle import RetryPolicy, keep_starting, reconcile, try_start
from nanobot.delivery.outbox import NewMessage, Outbox, OutboxEntry, OutboxStore, State
from nanobot.delivery.ownership import LaneOwnership, OneProcess
from nanobot.errors import ChannelError
from nanobot.health import StorageHealth

log = logging.getLogger(__name__)

ChannelFactory = Callable[[Config, MessageBus], Channel | None]

# Each platform module builds its channel from the whole config (None when disabled): its
# own section, plus ``api``'s upload limits for the files users send. No channel names here.
CHANNEL_FACTORIES: tuple[ChannelFactory, ...] = (TelegramChannel.from_config, DiscordChannel.from_config)

SHUTTING_DOWN = DeliveryReceipt("queued", "nanobot is shutting down; it will be sent after restart")
_API_ONLY = frozenset({OutboundKind.DELTA, OutboundKind.TOOL_PROGRESS})
APOLOGY = "Sorry, something went wrong while answering. Please try again in a moment."


def build_channel_manager(
    config: Config, bus: MessageBus, api: ApiChannel, health: StorageHealth | None = None
) -> ChannelManager:
    """Build the manager, its outbox (``<workspace>/outbox.db``, reporting to ``health``) and every
    enabled channel."""
    candidates = [ch for make in CHANNEL_FACTORIES if (ch := make(config, bus)) is not None]
    store = OutboxStore(config.agents.defaults.workspace_path / "outbox.db", health)
    return ChannelManager(bus, api, candidates, store, config.channels, grace=config.api.shutdown_grace)


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
        self._ownership: LaneOwnership = OneProcess()
        self._config = config
        self._policy = RetryPolicy(config)
        self._intake: list[OutboundMessage] = []
        self._intake_ready = asyncio.Event()
        self._lanes = Lanes(self._channels, store, self._policy, self._check_idle)
        self._starting: set[str] = set()  # channels unreachable at start, retrying in the background
        self._reload_wanted = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reloaded: set[int] | None = None  # while a reload reads: ids queued meanwhile
        self._tasks: set[asyncio.Task[None]] = set()  # intake, re-reads, late starts (lanes own theirs)
        self._grace = grace  # how long stop() waits for sends under way
        self._committing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def enabled(self) -> frozenset[str]:
        """Names of the channels this process delivers to (the ones that started)."""
        return frozenset(self._channels)

    @property
    def configured(self) -> frozenset[str]:
        """Names of the platform channels enabled in config, whether they are up or not."""
        return frozenset(ch.name for ch in self._candidates)

    @property
    def starting(self) -> frozenset[str]:
        """Channels unreachable at start that are still trying, in the background."""
        return frozenset(self._starting)

    @property
    def store(self) -> Outbox:
        """The outbox behind the durable channels."""
        return self._store

    def use_outbox(self, store: Outbox, ownership: LaneOwnership) -> None:
        """Keep the outbox in ``store`` (the one ``storage.url`` names), its lanes claimed through
        ``ownership``; before :meth:`start`."""
        self._store, self._ownership = store, ownership
        self._lanes.use(store, ownership)

    async def start(self) -> None:
        """Open the outbox, start the channels (refused: down; unreachable: retried), resume work."""
        await self._store.open()
        await self._ownership.start(self.request_reload)
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
        await self._lanes.finish(self._grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._lanes.cancel(SHUTTING_DOWN)
        await self._keep_leftovers()
        # Every candidate, not only the started ones: a retried start may have been cut short.
        for channel in [self._api, *self._candidates]:
            try:
                await channel.stop()
            except ChannelError as exc:
                log.warning("channel %s did not stop cleanly: %s", channel.name, exc)
        await self._ownership.stop()
        await self._store.close()

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
            m for m in self._bus.drain_outbound() if m.channel != self._api.name and m.kind not in _API_ONLY
        ]
        self._intake = []
        if leftovers and self._store.is_open:
            await self._commit(leftovers, deliver=False)

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
        delivered = self._api.deliver_nowait(msg)
        if msg.receipt is None:  # deltas and replies: nobody waits for a receipt (the hot path)
            return
        if delivered:
            resolve(msg, DeliveryReceipt("sent"))
        else:
            detail = f"no open request on api:{msg.chat_id}; the api channel only answers the current request"
            resolve(msg, DeliveryReceipt("failed", detail))

    def dispatch(self, msg: OutboundMessage) -> None:
        """Hand one platform message to the outbox (never awaits: the intake task commits it)."""
        if msg.kind in _API_ONLY:
            return  # streaming pieces and tool progress are for the API only; the REPLY carries the text
        self._intake.append(msg)
        self._intake_ready.set()
        self._idle.clear()

    async def wait_idle(self) -> None:
        """Take in what the bus holds, then wait until every message is delivered, failed or held."""
        for msg in self._bus.drain_outbound():
            self.route(msg)
        await self._idle.wait()

    def _check_idle(self) -> None:
        if not (self._intake or self._lanes.busy or self._committing or self._reloaded is not None):
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
            # No platform shows U+0000, and PostgreSQL text cannot hold it: dropped on every backend.
            meta = {_no_nul(k): _no_nul(v) for k, v in msg.metadata.items()}
            chat_id, text = _no_nul(msg.chat_id), _no_nul(content)
            news.append(NewMessage(msg.channel, chat_id, str(msg.kind), text, meta, held))
        try:
            entries = await self._store.add(news)
        except Exception as exc:  # the disk failed: every sender learns it, nothing is sent uncommitted
            log.error("outbox: could not store %d message(s): %s", len(batch), exc)
            for msg in batch:
                resolve(msg, DeliveryReceipt("failed", f"could not store the message: {exc}"))
            return
        for entry, msg in zip(entries, batch, strict=True):
            if entry.state == State.HELD:
                why = "is not reachable yet" if entry.channel in self._starting else "is not enabled"
                log.info("outbox: message %d for %s held: channel %s", entry.id, entry.channel, why)
                resolve(msg, DeliveryReceipt("queued", f"channel {entry.channel} {why}"))
                continue
            if not deliver:
                resolve(msg, SHUTTING_DOWN)
                continue
            if not self._ownership.holds(entry.channel, entry.chat_id):
                resolve(msg, ELSEWHERE)  # committed; the process holding that chat's lane sends it
                continue
            ahead = self._lanes.ahead(entry.channel, entry.chat_id)
            if ahead:  # its first attempt waits for theirs (maybe retrying for long): say so now
                plural = "s" if ahead > 1 else ""
                why = f"behind {ahead} earlier message{plural} to this chat"
                resolve(msg, DeliveryReceipt("queued", why))
                self._enqueue(entry)
            else:
                self._enqueue(entry, msg)

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
            watched = self._lanes.queued_ids()  # each in the file before the read: its row tells its fate
            self._reloaded = set()
            self._idle.clear()
            try:
                rows = await self._store.recover(self._durable(), self._config.held_max_age_seconds)
                queued = self._lanes.entries()
                edits = reconcile(rows, queued, watched, self._reloaded)
                for entry in edits.new:
                    self._enqueue(entry)
                self._lanes.drop(edits.dropped)
                self._lanes.wake([*edits.retried, *(queued[i] for i in edits.dropped)])
            finally:
                self._reloaded = None
                self._check_idle()
        if edits.new or edits.dropped or edits.retried:
            log.info("outbox: re-read: %d to send, %d dropped, %d retried by hand",
                     len(edits.new), len(edits.dropped), len(edits.retried))  # fmt: skip

    # ----------------------------------------------------------------------- tasks

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("channel manager task %s crashed", task.get_name(), exc_info=task.exception())

    def _enqueue(self, entry: OutboxEntry, msg: OutboundMessage | None = None) -> None:
        if self._lanes.enqueue(entry, msg):
            self._idle.clear()
            if self._reloaded is not None:
                self._reloaded.add(entry.id)


def _no_nul(text: str) -> str:
    return text.replace("\x00", "") if "\x00" in text else text
