"""Inbound chat across `nanobot serve` processes on one PostgreSQL: one process polls Telegram and
holds Discord's Gateway session, another takes over when it dies, and no update is handled twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from served import Served, serve

from fake_llm import FakeLLM, last_user_text
from fake_platforms import FakeDiscord, FakeTelegram, discord_section, telegram_section

Start = Callable[..., Awaitable[TestServer]]
DEADLINE = 30.0  # seconds for processes on a loaded machine to get somewhere (not a duration check)
pytestmark = pytest.mark.timeout(180)  # three processes starting on a loaded 2-core machine


async def leader_flags(http: aiohttp.ClientSession, procs: list[Served], channel: str) -> list[int]:
    """Each process's ``nanobot_channel_leader{channel=...}`` (from GET /metrics)."""
    flags = []
    for proc in procs:
        async with http.get(f"{proc.url}/metrics") as r:
            text = await r.text()
        line = f'nanobot_channel_leader{{channel="{channel}"}} '
        values = [int(float(row[len(line) :])) for row in text.splitlines() if row.startswith(line)]
        flags.append(values[0] if values else -1)
    return flags


async def one_leader(http: aiohttp.ClientSession, procs: list[Served], channel: str) -> Served:
    """Wait until exactly one of ``procs`` says it leads ``channel``; that one."""
    flags: list[int] = []
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                flags = await leader_flags(http, procs, channel)
                if sorted(flags) == [0] * (len(procs) - 1) + [1]:
                    return procs[flags.index(1)]
                await asyncio.sleep(0.1)  # (other processes' progress, polled with a deadline)
    except TimeoutError:
        raise AssertionError(f"not exactly one {channel} leader: {flags}") from None


async def seen_by_llm(fake_llm: FakeLLM, text: str) -> None:
    """Wait until a turn for ``text`` reached the model."""
    async with asyncio.timeout(DEADLINE):
        while not any(last_user_text(r) == text for r in fake_llm.requests):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def turns_for(fake_llm: FakeLLM, text: str) -> int:
    """How many turns the model was asked to answer ``text`` in."""
    return sum(last_user_text(r) == text for r in fake_llm.requests)


@contextlib.asynccontextmanager
async def processes(
    tmp_path: Path, fake_llm: FakeLLM, count: int, extra: dict[str, Any]
) -> AsyncIterator[list[Served]]:
    """``count`` `nanobot serve` processes, each with its own workspace, on the same config."""
    llm = fake_llm.url  # type: ignore[attr-defined]
    async with contextlib.AsyncExitStack() as stack:
        procs = []
        for i in range(count):
            (tmp_path / str(i)).mkdir()
            procs.append(await stack.enter_async_context(serve(tmp_path / str(i), llm, {}, extra=extra)))
        yield procs


def pg_channels(pg_url: str, **channels: Any) -> dict[str, Any]:
    """Config sections: shared storage with short leases, and these channels (fast retries)."""
    return {
        "storage": {"url": pg_url, "leaseSeconds": 2},
        "channels": {"retryBaseSeconds": 0.01, "retryMaxSeconds": 0.1, **channels},
    }


async def test_one_process_polls_telegram_and_another_takes_over_without_repeats(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str, aiohttp_server: Start
) -> None:
    """Three servers on one bot: one polls; kill -9 it and another polls within 5 s, and a message
    the dead one already handed on (but Telegram never saw confirmed) is not answered again."""
    telegram = FakeTelegram()
    root = str((await aiohttp_server(telegram.app)).make_url("")).rstrip("/")
    extra = pg_channels(pg_url, telegram=telegram_section(root))
    async with processes(tmp_path, fake_llm, 3, extra) as procs, aiohttp.ClientSession() as http:
        await telegram.until(lambda: telegram.get_updates_calls >= 4, within=DEADLINE)
        assert telegram.conflicts == 0 and len(set(telegram.pollers)) == 1, telegram.pollers
        leader = await one_leader(http, procs, "telegram")
        # The leader hands the message on but its confirmation never reaches Telegram (as when
        # it dies between the two): the next leader gets the message again from Telegram.
        telegram.freeze_confirmations = True
        await telegram.push_text(5, 7, "first message")
        await seen_by_llm(fake_llm, "first message")
        await telegram.until(lambda: telegram.texts(5) == ["echo: first message"], within=DEADLINE)
        polled = len(telegram.pollers)
        leader.proc.kill()
        await leader.proc.wait()
        telegram.freeze_confirmations = False
        await telegram.until(
            lambda: len(telegram.pollers) > polled and telegram.pollers[-1] != telegram.pollers[polled - 1],
            within=5,
        )
        rest = [p for p in procs if p is not leader]
        assert await one_leader(http, rest, "telegram") is not leader
        await telegram.push_text(5, 7, "second message")
        await seen_by_llm(fake_llm, "second message")
        await telegram.handled()  # the new leader confirmed both: it has seen the first one too
        assert turns_for(fake_llm, "first message") == 1
        assert turns_for(fake_llm, "second message") == 1
        assert telegram.conflicts == 0
        for proc in rest:
            assert "Traceback" not in proc.log, proc.log


@pytest.mark.parametrize("end", ["killed", "stopped"])
async def test_one_process_holds_the_discord_gateway_session(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str, aiohttp_server: Start, end: str
) -> None:
    """Two servers on one Discord bot open one Gateway session; when its holder dies (kill -9) or
    is stopped (SIGTERM, as in a rolling restart) the other resumes that session, so what was sent
    while nobody was connected is replayed and answered, and nothing is answered twice."""
    discord = FakeDiscord()
    server = await aiohttp_server(discord.app)
    root = str(server.make_url("")).rstrip("/")
    discord.gateway_url = f"{root.replace('http', 'ws', 1)}/gateway?v=10&encoding=json"
    section = discord_section(root)
    section["gatewayUrl"] = discord.gateway_url
    async with (
        processes(tmp_path, fake_llm, 2, pg_channels(pg_url, discord=section)) as procs,
        aiohttp.ClientSession() as http,
    ):
        leader = await one_leader(http, procs, "discord")
        await discord.until(lambda: len(discord.identifies) == 1 and discord.ws is not None, within=DEADLINE)
        await discord.dispatch_message("77", "hello discord")
        await seen_by_llm(fake_llm, "hello discord")
        if end == "killed":
            leader.proc.kill()
        else:
            leader.terminate()  # (it closes its connection so that the session stays resumable)
        await leader.proc.wait()
        await discord.dispatch_message("77", "sent while nobody was connected")
        await discord.until(lambda: len(discord.resumes) == 1 and discord.ws is not None, within=DEADLINE)
        follower = next(p for p in procs if p is not leader)
        assert await leader_flags(http, [follower], "discord") == [1]
        assert discord.resumes[0]["session_id"] == discord.session_id and len(discord.identifies) == 1
        assert discord.ended_sessions == []
        await seen_by_llm(fake_llm, "sent while nobody was connected")  # (replayed on RESUME)
        await discord.dispatch_message("77", "after the takeover")
        await seen_by_llm(fake_llm, "after the takeover")
        assert turns_for(fake_llm, "hello discord") == 1
        assert turns_for(fake_llm, "sent while nobody was connected") == 1
        assert discord.most_connections == 1


async def test_webhook_calls_land_on_any_process_and_a_retry_is_handled_once(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str, aiohttp_server: Start
) -> None:
    """In webhook mode both servers take Telegram's calls; an update Telegram sends again to the
    other server is answered 200 and not handled twice. Nobody polls."""
    telegram = FakeTelegram()
    root = str((await aiohttp_server(telegram.app)).make_url("")).rstrip("/")
    section = telegram_section(root)
    section["webhook"] = {"url": "https://bot.example.test/hooks/telegram", "secret": "s3cret_Token-1-long"}
    update = {"update_id": 501, "message": {"message_id": 1, "from": {"id": 7, "is_bot": False},
              "chat": {"id": 5, "type": "private"}, "date": 0, "text": "sent twice"}}  # fmt: skip
    later = {**update, "update_id": 502, "message": {**update["message"], "text": "sent once"}}
    headers = {"Host": "bot.example.test", "X-Telegram-Bot-Api-Secret-Token": "s3cret_Token-1-long"}
    async with (
        processes(tmp_path, fake_llm, 2, pg_channels(pg_url, telegram=section)) as (one, two),
        aiohttp.ClientSession() as http,
    ):
        await telegram.until(lambda: len(telegram.webhook_calls) == 2, within=DEADLINE)
        for proc, body in ((one, update), (two, update), (two, later)):
            async with http.post(f"{proc.url}/hooks/telegram", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
        await seen_by_llm(fake_llm, "sent once")
        assert turns_for(fake_llm, "sent twice") == 1
        assert telegram.get_updates_calls == 0
        assert await leader_flags(http, [one, two], "telegram") == [1, 1]
