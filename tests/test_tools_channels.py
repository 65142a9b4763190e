"""Tools on a chat channel: progress events stay off the chat, and per-channel tool choice applies."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp.test_utils import TestServer

import fake_platforms as fp
from fake_llm import FakeLLM, Step

ServerFactory = Callable[..., Awaitable[TestServer]]
StartGateway = Callable[..., Awaitable[str]]


async def test_telegram_turn_with_tools_sends_only_the_answer(
    start_gateway: StartGateway, aiohttp_server: ServerFactory, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """A Telegram chat whose turn runs tools gets the answer only: no tool progress is sent to it."""
    telegram = fp.FakeTelegram()
    url = str((await aiohttp_server(telegram.app, access_log=None)).make_url("")).rstrip("/")
    config = {
        "channels": {
            "retryBaseSeconds": 0.001,
            "retryMaxSeconds": 0.01,
            "telegram": fp.telegram_section(url),
        },
        "tools": {"channels": {"telegram": {"enabled": ["list_dir"]}}},
    }
    await start_gateway(config)
    fake_llm.push(
        Step(tool_calls=[("list_dir", {"path": "."}), ("write_file", {"path": "a", "content": "b"})])
    )
    fake_llm.push(Step(text="done"))
    await telegram.until(lambda: telegram.get_updates_calls > 0)
    await telegram.push_text(chat_id=4242, user_id=17, text="look around")
    await telegram.until(lambda: "done" in telegram.texts(4242))
    assert telegram.texts(4242) == ["done"]
    db = sqlite3.connect(tmp_path / "ws" / "outbox.db")
    try:
        kinds = [kind for (kind,) in db.execute("SELECT kind FROM outbox ORDER BY id")]
    finally:
        db.close()
    assert kinds == ["reply"]  # nothing but the answer went through the outbox
    assert [t["function"]["name"] for t in fake_llm.requests[0]["tools"]] == ["list_dir"]
    results = [m["content"] for m in fake_llm.requests[1]["messages"] if m["role"] == "tool"]
    assert results == ["(empty folder)", "Error: unknown tool 'write_file'"]
