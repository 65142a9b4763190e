"""End to end: the whole gateway (agent, fake LLM, channels, outbox) against fake platforms."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import orjson
from aiohttp.test_utils import TestServer

import fake_platforms as fp
from fake_llm import FakeLLM, Step

ServerFactory = Callable[..., Awaitable[TestServer]]
StartGateway = Callable[..., Awaitable[str]]
SRC = Path(__file__).resolve().parents[1] / "src"


async def serve_fake(app_owner: fp.FakeTelegram | fp.FakeDiscord, aiohttp_server: ServerFactory) -> str:
    """Run a fake platform on loopback; returns its base URL."""
    server = await aiohttp_server(app_owner.app, access_log=None)
    return str(server.make_url("")).rstrip("/")


def channels(**sections: dict[str, Any]) -> dict[str, Any]:
    """The ``channels`` config section, with instant backoff for tests."""
    return {"channels": {"retryBaseSeconds": 0.001, "retryMaxSeconds": 0.01, **sections}}


async def test_telegram_message_is_answered_in_the_same_chat(
    start_gateway: StartGateway, aiohttp_server: ServerFactory
) -> None:
    """A Telegram user's message goes through the agent, and the reply arrives in the same chat."""
    telegram = fp.FakeTelegram()
    url = await serve_fake(telegram, aiohttp_server)
    await start_gateway(channels(telegram=fp.telegram_section(url)))
    await telegram.until(lambda: telegram.get_updates_calls > 0)
    await telegram.push_text(chat_id=4242, user_id=17, text="hello there")
    await telegram.until(lambda: telegram.texts(4242) == ["echo: hello there"])


async def test_discord_message_is_answered_in_the_same_channel(
    start_gateway: StartGateway, aiohttp_server: ServerFactory
) -> None:
    """A Discord user's message goes through the agent, and the reply is posted in the same channel."""
    discord = fp.FakeDiscord()
    url = await serve_fake(discord, aiohttp_server)
    discord.gateway_url = f"{url}/gateway"
    await start_gateway(channels(discord=fp.discord_section(url)))
    await discord.until(lambda: discord.ws is not None)
    await discord.dispatch_message("3001", "hi from discord")
    await discord.until(lambda: discord.contents("3001") == ["echo: hi from discord"])


async def test_api_agent_sends_to_telegram_with_the_message_tool(
    start_gateway: StartGateway, aiohttp_server: ServerFactory, fake_llm: FakeLLM
) -> None:
    """An API request whose agent calls `message` for Telegram makes the chat get the text."""
    telegram = fp.FakeTelegram()
    url = await serve_fake(telegram, aiohttp_server)
    args = {"content": "Build finished", "channel": "telegram", "chat_id": "777"}
    fake_llm.push(Step(tool_calls=[("message", args)]), Step(text="I told them."))
    gateway = await start_gateway(channels(telegram=fp.telegram_section(url)))
    async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="dummy", max_retries=0) as client:
        answer = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "tell the team"}]
        )
    assert answer.choices[0].message.content == "I told them."
    assert telegram.texts("777") == ["Build finished"]
    tool_results = [m for m in fake_llm.requests[-1]["messages"] if m.get("role") == "tool"]
    assert [m["content"] for m in tool_results] == ["sent"]


# --------------------------------------------------------------------------- crash safety


async def start_serve(config_path: Path, log_path: Path) -> asyncio.subprocess.Process:
    """Start `nanobot serve` as a real process."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = log_path.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nanobot", "serve", "-c", str(config_path),
            stdout=log, stderr=log, env=env,
        )  # fmt: skip
    finally:
        log.close()


def stored(workspace: Path) -> int:
    """How many messages the outbox holds (the test reads the WAL database alongside the server)."""
    path = workspace / "outbox.db"
    if not path.exists():
        return 0
    conn = sqlite3.connect(path, timeout=5)
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:  # the table does not exist yet
        return 0
    finally:
        conn.close()


async def wait_stored(workspace: Path, count: int, within: float = 30.0) -> None:
    """Poll the outbox file, with a deadline, until it holds ``count`` messages."""
    async with asyncio.timeout(within):
        # Another process writes the file: there is no event to await, so poll with a deadline.
        while stored(workspace) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_sigkill_mid_delivery_loses_nothing(
    fake_llm: FakeLLM, aiohttp_server: ServerFactory, tmp_path: Path, unused_tcp_port: int
) -> None:
    """`nanobot serve` killed with SIGKILL mid-delivery and restarted still delivers every reply."""
    telegram = fp.FakeTelegram()
    telegram.hold_after = 3  # the fourth send hangs: the process dies with it in flight
    url = await serve_fake(telegram, aiohttp_server)
    workspace = tmp_path / "ws"
    config = {
        "api": {"port": unused_tcp_port},
        "agents": {"defaults": {"model": "test-model", "provider": "fake", "workspace": str(workspace)}},
        "providers": {"fake": {"apiBase": fake_llm.url, "apiKey": "sk-upstream"}},  # type: ignore[attr-defined]
        **channels(telegram=fp.telegram_section(url)),
    }
    config_path = tmp_path / "config.json"
    config_path.write_bytes(orjson.dumps(config))
    log_path = tmp_path / "serve.log"
    expected = [f"echo: m{i}" for i in range(12)]

    proc = await start_serve(config_path, log_path)
    try:
        await telegram.until(lambda: telegram.get_updates_calls > 0, within=30)
        for i in range(12):
            telegram.add_text(chat_id=55, user_id=1, text=f"m{i}")
        await telegram.changed()
        await wait_stored(workspace, 12)
        await telegram.until(lambda: telegram.parked > 0)
        proc.kill()
        await proc.wait()
        assert len(telegram.texts(55)) == 3
        telegram.release.set()

        proc = await start_serve(config_path, log_path)
        await telegram.until(lambda: set(expected) <= set(telegram.texts(55)), within=30)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
        sys.stderr.write(log_path.read_text(errors="replace")[-3000:])
    firsts = sorted(set(telegram.texts(55)), key=telegram.texts(55).index)
    assert firsts == expected  # everything arrived, in order of first delivery
