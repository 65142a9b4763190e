"""The outbox over a server's life: a clean stop, a blocked chat, a disabled channel, a split
message retried, and a disk that fails — each as the user (or the model) would notice it."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from nanobot.bus import MessageBus, OutboundMessage
from nanobot.channels.api import ApiChannel
from nanobot.delivery.manager import build_channel_manager
from nanobot.storage.outbox import NewMessage, State
from nanobot.storage.sqlite.outbox import OutboxStore
from nanobot.tools import MessageTool, ToolContext

from fake_platforms import Failure, FakeTelegram, make_config, running
from fake_platforms import outbox_entries as entries

ServerFactory = Callable[..., Awaitable[TestServer]]


class AcceptsThenStalls(FakeTelegram):
    """A Bot API that records each message at once but answers only once ``answer`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.answer.set()

    async def _send_message(self, payload: dict[str, Any]) -> web.Response:
        response = await super()._send_message(payload)
        await self.answer.wait()
        return response


@pytest.fixture
async def fake() -> AcceptsThenStalls:
    """A fresh fake Bot API (answering at once unless told otherwise)."""
    return AcceptsThenStalls()




def tool_context(bus: MessageBus) -> ToolContext:
    """A `message` tool call made by a turn on the API."""
    return ToolContext(bus, "api", "default", "req-1")


async def test_clean_stop_lets_an_accepted_send_finish(
    fake: AcceptsThenStalls, telegram_url: str, tmp_path: Path
) -> None:
    """A send the platform took just before SIGTERM is recorded as delivered, not sent again after
    restart; the next message in that chat waits for the restart instead of starting during shutdown."""
    config = make_config(tmp_path, telegram=telegram_url)
    fake.answer.clear()
    manager = build_channel_manager(config, MessageBus(), ApiChannel())
    await manager.start()
    manager.dispatch(OutboundMessage("telegram", "9", "exactly once"))
    manager.dispatch(OutboundMessage("telegram", "9", "after the restart"))
    await fake.until(lambda: len(fake.sent) == 1)  # the platform has it; its answer is still on the way
    stopping = asyncio.create_task(manager.stop())
    await asyncio.sleep(0)  # one turn of the loop: stop() has begun (no sleeping for work here)
    fake.answer.set()
    await stopping
    assert entries(config) == [(1, State.DELIVERED, "exactly once"), (2, State.PENDING, "after the restart")]
    assert fake.texts("9") == ["exactly once"]
    async with running(config) as manager:
        await manager.wait_idle()
    assert fake.texts("9") == ["exactly once", "after the restart"]


async def test_message_to_a_blocked_chat_is_answered_at_once(
    fake: AcceptsThenStalls, telegram_url: str, tmp_path: Path
) -> None:
    """During an outage, a send to a chat stuck behind a retrying message says so at once."""
    fake.failures.append(Failure(429, "Too Many Requests", retry_after=3600))
    bus = MessageBus()
    tool = MessageTool(receipt_timeout=30)
    ctx = tool_context(bus)
    async with running(make_config(tmp_path, telegram=telegram_url), bus):
        first = await tool.execute({"content": "one", "channel": "telegram", "chat_id": "9"}, ctx)
        assert first.startswith("queued: will retry in ")
        assert "s: telegram sendMessage: Too Many Requests" in first
        second = await tool.execute({"content": "two", "channel": "telegram", "chat_id": "9"}, ctx)
        assert second == "queued: behind 1 earlier message to this chat"
        third = await tool.execute({"content": "three", "channel": "telegram", "chat_id": "9"}, ctx)
        assert third == "queued: behind 2 earlier messages to this chat"
        other = await tool.execute({"content": "elsewhere", "channel": "telegram", "chat_id": "10"}, ctx)
        assert other == "sent"  # other chats do not wait
    assert fake.texts("9") == []  # the platform was still refusing chat 9 throughout


async def test_pending_rows_of_a_channel_disabled_since_are_held(
    fake: AcceptsThenStalls, telegram_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages left pending for a channel that is disabled at the next start are held, with no crash."""
    config = make_config(tmp_path)  # telegram is not enabled this time
    store = OutboxStore(config.agents.defaults.workspace_path / "outbox.db")
    await store.open()
    await store.add([NewMessage("telegram", "9", "reply", f"left over {i}", {}) for i in range(2)])
    await store.close()
    with caplog.at_level(logging.ERROR):
        async with running(config) as manager:
            await manager.wait_idle()
    assert entries(config) == [(1, State.HELD, "left over 0"), (2, State.HELD, "left over 1")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    async with running(make_config(tmp_path, telegram=telegram_url)) as manager:  # enabled again
        await manager.wait_idle()
    assert fake.texts("9") == ["left over 0", "left over 1"]


async def test_retried_split_message_does_not_resend_delivered_parts(
    fake: AcceptsThenStalls, telegram_url: str, tmp_path: Path
) -> None:
    """A long reply whose second part failed once is completed without sending its first part again."""
    fake.rate_limit_every = 2  # the 2nd sendMessage (part two) gets a 429; the 3rd succeeds
    fake.rate_limit_retry_after = 0.01
    text = "first part " * 330 + "\n\n" + "second part " * 330
    async with running(make_config(tmp_path, telegram=telegram_url)) as manager:
        manager.dispatch(OutboundMessage("telegram", "9", text))
        await manager.wait_idle()
    texts = fake.texts("9")
    assert [t.split()[:2] for t in texts] == [["first", "part"], ["second", "part"]]
    assert fake.send_calls == 3


async def test_outbox_that_cannot_commit_is_reported_as_failed(
    fake: AcceptsThenStalls, telegram_url: str, tmp_path: Path
) -> None:
    """When the outbox cannot store a message (the database stays locked), the model hears "failed"."""
    bus = MessageBus()
    config = make_config(tmp_path, telegram=telegram_url)
    async with running(config, bus):
        blocker = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
        try:
            result = await MessageTool().execute(
                {"content": "important", "channel": "telegram", "chat_id": "9"}, tool_context(bus)
            )
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
    assert result.startswith("failed: could not store the message"), result
    assert "locked" in result
    assert fake.send_calls == 0
