"""The composition root: builds every part from config and owns their start/stop order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from nanobot.agent.loop import AgentLoop
from nanobot.attachments import shutdown_extractors
from nanobot.bus import MessageBus
from nanobot.channels.api import ApiChannel
from nanobot.channels.telegram import TelegramChannel
from nanobot.config import Config, describe_provider, safe_url
from nanobot.delivery.lifecycle import RetryPolicy, reload_on_signal
from nanobot.delivery.manager import ChannelManager, build_channel_manager
from nanobot.errors import NanobotError
from nanobot.gateway.app import create_app
from nanobot.gateway.connections import make_runner, run_until
from nanobot.gateway.sessions_api import SESSION_STORE
from nanobot.gateway.state import STATE
from nanobot.gateway.telegram_webhook import add_telegram_webhook
from nanobot.gateway.worker_metrics import SIBLINGS, Siblings
from nanobot.metrics import Family
from nanobot.providers.openai_compat import OpenAICompatProvider
from nanobot.storage import open_storage
from nanobot.tools import ToolRegistry
from nanobot.tools.builtin import builtin_tools
from nanobot.tools.mcp import McpServers
from nanobot.workspace import WorkspaceLock

log = logging.getLogger(__name__)

CHANNELS = web.AppKey("channels", ChannelManager)
_SCRAPE_WAIT = 2.0  # seconds a /metrics scrape waits for the outbox's counts before leaving them out


def build_app(config: Config) -> web.Application:
    """The gateway app with the whole runtime (sessions, provider, agent, channels) in its cleanup_ctx."""
    bus = MessageBus()
    api = ApiChannel(max_turns=config.api.max_concurrent_turns)
    app = create_app(config, bus, api)
    readiness = app[STATE].readiness
    app[CHANNELS] = manager = build_channel_manager(config, bus, api, readiness.store("outbox"))
    webhook = config.channels.telegram.webhook
    for channel in manager.candidates:
        if isinstance(channel, TelegramChannel) and webhook.enabled:
            add_telegram_webhook(app, webhook, channel)

    async def workspace(_app: web.Application) -> AsyncIterator[None]:
        # First: nothing else may touch the workspace unless it is ours alone (SQLite), or
        # shared only with other servers on the same kind of storage (PostgreSQL).
        lock = WorkspaceLock.acquire(config.agents.defaults.workspace_path, shared=config.storage.is_postgres)
        try:
            yield
        finally:
            lock.release()

    mcp = McpServers(config.tools.mcp_servers, RetryPolicy(config.channels))

    async def mcp_servers(_app: web.Application) -> AsyncIterator[None]:
        mcp.start()  # in the background: /health and the agent never wait for a server
        try:
            yield
        finally:
            await mcp.close()

    async def runtime(_app: web.Application) -> AsyncIterator[None]:
        defaults = config.agents.defaults
        _name, provider_config = config.provider()
        storage = await open_storage(config, readiness)
        sessions = storage.sessions
        manager.use_outbox(storage.outbox, storage.ownership)
        app[SESSION_STORE].store = sessions  # the /v1/sessions routes
        provider = OpenAICompatProvider(provider_config, model=defaults.model)
        await provider.start()
        tools = ToolRegistry(builtin_tools(config), sources=[mcp], config=config.tools)
        metrics = app[STATE].metrics
        agent = AgentLoop(
            bus,
            provider,
            sessions,
            tools,
            defaults,
            turn_timeout=config.api.timeout,
            pressure=api,
            metrics=metrics,
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            await manager.start()
            tasks.append(asyncio.create_task(manager.run(), name="nanobot-channels"))
            tasks.append(asyncio.create_task(agent.run(), name="nanobot-agent"))
            with metrics.watching(*_runtime_families(agent, manager)):
                yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await manager.stop()
            await provider.close()
            app[SESSION_STORE].store = None
            await storage.close()
            await shutdown_extractors()

    app.cleanup_ctx.append(workspace)
    app.cleanup_ctx.append(mcp_servers)
    app.cleanup_ctx.append(runtime)
    return app


def _runtime_families(agent: AgentLoop, manager: ChannelManager) -> tuple[Family, ...]:
    """What the running parts report to /metrics, read when scraped."""

    async def outbox() -> dict[str, int] | None:
        # On the outbox's writer thread; a scrape never waits long behind a stuck disk.
        async with asyncio.timeout(_SCRAPE_WAIT):
            return await manager.store.counts()

    def channels(value: Callable[[str], int]) -> Callable[[], dict[str, int]]:
        return lambda: {name: value(name) for name in manager.configured}

    return (
        Family("nanobot_running_turns", "Agent turns running now, on every channel.", lambda: agent.running),
        Family(
            "nanobot_outbox_messages",
            "Outbox messages by state (delivered ones are not counted).",
            outbox,
            label="state",
        ),
        Family(
            "nanobot_channel_up",
            "1 when a configured chat channel is connected, 0 while it is down.",
            channels(lambda name: int(name in manager.enabled)),
            label="channel",
        ),
        # Several processes on PostgreSQL: one leads each polling channel (Telegram webhook: all).
        Family(
            "nanobot_channel_leader",
            "1 when this process receives a chat channel's updates.",
            lambda: {channel.name: int(channel.leading) for channel in manager.candidates},
            label="channel",
        ),
    )


def install_uvloop() -> None:
    """Use uvloop's faster event loop when it is installed."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def describe(config: Config, source: str) -> None:
    """Log what this server runs: config, provider, API base (no secrets), model, workspace."""
    provider = describe_provider(config)
    log.info("config: %s", source or "built-in defaults (no config file)")
    log.info("provider: %s at %s, model %s", provider.name, provider.api_base, config.model)
    log.info("workspace: %s", config.agents.defaults.workspace_path)
    if config.storage.is_postgres:
        log.info("storage: %s (shared)", safe_url(config.storage.url))
    if provider.key_missing:
        log.warning("provider %s has no apiKey: an upstream that needs one refuses every request "
                    "(set providers.%s.apiKey)", provider.name, provider.name)  # fmt: skip


async def serve(
    config: Config,
    *,
    ready: asyncio.Event | None = None,
    source: str = "",
    reuse_port: bool = False,
    siblings: Siblings | None = None,
) -> None:
    """Run the gateway until SIGINT/SIGTERM (or cancellation), then shut down in order.

    ``source`` is where the config came from (a path; empty: the built-in defaults);
    ``reuse_port``: share the port with sibling workers (SO_REUSEPORT; see ``workers.py``);
    ``siblings``: where they are, so that ``/metrics`` adds up all of them.
    """
    app = build_app(config)
    own_metrics: web.AppRunner | None = None
    if siblings is not None and config.api.metrics:
        app[SIBLINGS] = siblings
    runner = make_runner(app, config.api)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        # Inside the try: a start-up that fails half-way still unwinds what it started.
        await runner.setup()
        site = web.TCPSite(
            runner, config.api.host, config.api.port, backlog=1024, reuse_address=True, reuse_port=reuse_port
        )
        try:
            await site.start()
        except OSError as exc:  # the port is taken, or the address is not ours
            where = f"{config.api.host}:{config.api.port}"
            raise NanobotError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        if SIBLINGS in app:
            own_metrics = await app[SIBLINGS].serve_own(app[STATE].metrics)
        log.info(
            "nanobot gateway listening on http://%s:%d (model %s)",
            config.api.host,
            config.api.port,
            config.model,
        )
        describe(config, source)
        # Everything built so far lives for the whole process: keep it out of the collector's
        # generations, so full collections stay short under load (fewer p99 pauses).
        gc.collect()
        gc.freeze()
        # A young collection walks the objects still alive, i.e. the requests in flight, not
        # the garbage (freed by reference counting): every 20,000 allocations instead of 700
        # does the same walk 28x less often. Cycles are rare here; they wait a little longer.
        gc.set_threshold(20_000, 10, 10)
        # `nanobot outbox retry|drop` signals SIGUSR1 (via <workspace>/nanobot.pid) to apply at once;
        # on PostgreSQL it sends a NOTIFY, which the outbox itself listens for.
        workspace_path = config.agents.defaults.workspace_path
        hand_edits = (contextlib.nullcontext() if config.storage.is_postgres
                      else reload_on_signal(workspace_path, app[CHANNELS].request_reload))  # fmt: skip
        with hand_edits:
            if ready is not None:
                ready.set()
            await run_until(stop, runner, config.api)
    finally:
        if own_metrics is not None:
            await own_metrics.cleanup()
        await runner.cleanup()
