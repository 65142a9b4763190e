"""Dispatches the agent's outbound messages to channels by name, and runs the channels.

Non-durable channels (``api``) get them directly, with no awaits. Every other target goes
through the durable outbox (see ``outbox.py``): the message is committed first by the
*intake* (``intake.py``), then delivered by its chat's *lane* (``lanes.py``), in order per
chat. Messages for channels that are not enabled (or refused at start) are held, never sent.
A channel whose platform was unreachable at start keeps trying in the background (see
``lifecycle.py``); its messages are held meanwhile, and go out once it is up.

:meth:`ChannelManager.reload` re-reads the outbox (``rereads.py``) after a hand edit
(``nanobot outbox retry|drop``, announced by ``SIGUSR1``, or ``NOTIFY`` on PostgreSQL), a late
channel start, or another process's work. Each of these parts owns its own state; the manager
owns the channels and composes the parts.
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
from nanobot.delivery.intake import APOLOGY, SHUTTING_DOWN, Intake
from nanobot.delivery.lanes import Lanes, resolve
from nanobot.delivery.lifecycle import RetryPolicy, keep_starting, try_start
from nanobot.delivery.ownership import LaneOwnership, OneProcess
from nanobot.delivery.rereads import Rereads
from nanobot.errors import ChannelError
from nanobot.health import StorageHealth
from nanobot.storage.outbox import Outbox, OutboxEntry
from nanobot.storage.sqlite.outbox import OutboxStore

__all__ = ["APOLOGY", "SHUTTING_DOWN", "ChannelManager", "build_channel_manager"]

log = logging.getLogger(__name__)

ChannelFactory = Callable[[Config, MessageBus], Channel | None]

# Each platform module builds its channel from the whole config (None when disabled): its
# own section, plus ``api``'s upload limits for the files users send. No channel names here.
CHANNEL_FACTORIES: tuple[ChannelFactory, ...] = (TelegramChannel.from_config, DiscordChannel.from_config)

_API_ONLY = frozenset({OutboundKind.DELTA, OutboundKind.TOOL_PROGRESS})


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
        self._starting: set[str] = set()  # channels unreachable at start, retrying in the background
        # Each part owns its own state: the lanes what is queued and under way, the intake what
        # is not committed yet, the re-reads what a re-read is doing. The manager owns the channels.
        self._lanes = Lanes(self._channels, store, self._policy, self._check_idle)
        self._intake = Intake(store, self._ownership, self._lanes, self._channels, self._starting,
                              self._enqueue, self._check_idle)  # fmt: skip
        self._rereads = Rereads(store, self._lanes, self._enqueue, self._durable, config.held_max_age_seconds,
                                self._check_idle)  # fmt: skip
        self._tasks: set[asyncio.Task[None]] = set()  # intake, re-reads, late starts (lanes own theirs)
        self._grace = grace  # how long stop() waits for sends under way
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
    def candidates(self) -> tuple[Channel, ...]:
        """The platform channels enabled in config, whether they are up or not."""
        return tuple(self._candidates)

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
        self._intake.use(store, ownership)
        self._rereads.use(store)

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
        self._spawn(self._intake.run())
        self._spawn(self._rereads.run())

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
        leftovers = self._intake.take() + [
            m for m in self._bus.drain_outbound() if m.channel != self._api.name and m.kind not in _API_ONLY
        ]
        if leftovers and self._store.is_open:
            await self._intake.commit(leftovers, deliver=False)

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
        self._intake.put(msg)
        self._idle.clear()

    async def wait_idle(self) -> None:
        """Take in what the bus holds, then wait until every message is delivered, failed or held."""
        for msg in self._bus.drain_outbound():
            self.route(msg)
        await self._idle.wait()

    def _check_idle(self) -> None:
        if self._intake.busy or self._lanes.busy or self._rereads.busy:
            self._idle.clear()
        else:
            self._idle.set()

    # ----------------------------------------------------------------------- hand edits

    def request_reload(self) -> None:
        """Ask for a :meth:`reload` (for a signal handler: never blocks; requests coalesce)."""
        self._rereads.request()

    async def reload(self) -> None:
        """Re-read the outbox: queue what became pending, skip what was dropped, wake retried heads."""
        await self._rereads.reread()

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
            self._rereads.queued(entry.id)

