"""A burst of 1,000 messages to one Telegram chat, through scripted rate limits."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp.test_utils import TestServer

from nanobot.bus import MessageBus, OutboundKind, OutboundMessage
from nanobot.storage.outbox import State
from nanobot.storage.sqlite.outbox import connect, select

from fake_platforms import FakeTelegram, make_config, running

ServerFactory = Callable[..., Awaitable[TestServer]]
BURST = 1000


async def test_burst_to_one_chat_survives_429s_in_order(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """1,000 messages to one chat all arrive, once each, in order, though every 97th call gets a 429."""
    fake = FakeTelegram()
    fake.rate_limit_every = 97
    fake.rate_limit_retry_after = 0.05  # Telegram sends whole seconds; a fraction keeps the test short
    server = await aiohttp_server(fake.app, access_log=None)
    config = make_config(tmp_path, telegram=str(server.make_url("")).rstrip("/"))
    bus = MessageBus()
    async with running(config, bus) as manager:
        started = time.perf_counter()
        for i in range(BURST):
            bus.publish_outbound(OutboundMessage("telegram", "5", f"message {i}", OutboundKind.MESSAGE))
        await fake.until(lambda: len(fake.sent) >= BURST, within=50)
        elapsed = time.perf_counter() - started
        await manager.wait_idle()
    assert fake.texts("5") == [f"message {i}" for i in range(BURST)]
    rate_limited = fake.send_calls - BURST
    assert rate_limited >= BURST // 97
    conn = connect(tmp_path / "outbox.db")
    assert {e.state for e in select(conn)} == {State.DELIVERED}
    conn.close()
    print(f"\n{BURST} messages, {rate_limited} 429s: {elapsed:.2f}s, {BURST / elapsed:.0f} msg/s")
