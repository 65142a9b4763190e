"""The outbox across real `nanobot serve` processes on one PostgreSQL, with the fake LLM and Telegram.

Messages are enqueued through the API: a turn's model calls the ``message`` tool for another
chat, through whichever process the request reached. Every test checks what the fake Telegram
received: each message once, in order per chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from served import Served, free_port, serve

from fake_llm import FakeLLM, Json, Step
from fake_platforms import Failure, FakeTelegram, telegram_section

ServerFactory = Callable[..., Awaitable[TestServer]]
_SEND = re.compile(r"send (\S+) (\d+) (\d+)")


class Sender(FakeLLM):
    """A model that, asked "send CHAT FIRST COUNT", calls ``message`` COUNT times for that
    Telegram chat (texts "CHAT:FIRST" ...), then answers "done"."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body: Json = await request.json()
        last = body["messages"][-1]
        if last["role"] == "tool":
            return await self._answer(request, body, Step(text="done"))
        chat, first, count = _SEND.fullmatch(last["content"]).groups()  # type: ignore[union-attr]
        calls = [("message", {"channel": "telegram", "chat_id": chat, "content": f"{chat}:{k}"})
                 for k in range(int(first), int(first) + int(count))]  # fmt: skip
        return await self._answer(request, body, Step(tool_calls=calls))


@pytest.fixture
async def sender(aiohttp_server: ServerFactory) -> Sender:
    llm = Sender()
    server = await aiohttp_server(llm.app())
    llm.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return llm


@pytest.fixture
async def telegram(aiohttp_server: ServerFactory) -> tuple[FakeTelegram, str]:
    fake = FakeTelegram()
    server = await aiohttp_server(fake.app, access_log=None)
    return fake, str(server.make_url("")).rstrip("/")


@contextlib.asynccontextmanager
async def three_servers(
    tmp_path: Path, llm: Sender, telegram_url: str, pg_url: str, lease: float
) -> AsyncIterator[list[Served]]:
    """Three `nanobot serve` processes, each with its own workspace, on one database."""
    extra: dict[str, Any] = {
        "storage": {"url": pg_url, "leaseSeconds": lease},
        "channels": {"retryBaseSeconds": 0.001, "retryMaxSeconds": 0.01,
                     "telegram": telegram_section(telegram_url)},
    }
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for name in "abc":
            (tmp_path / name).mkdir()
            url = llm.url  # type: ignore[attr-defined]
            servers.append(await stack.enter_async_context(serve(tmp_path / name, url, {}, extra=extra)))
        yield servers


async def send(http: aiohttp.ClientSession, server: Served, chat: str, first: int, count: int) -> None:
    """One turn through ``server`` whose model sends ``count`` messages to ``chat``."""
    body = {"messages": [{"role": "user", "content": f"send {chat} {first} {count}"}],
            "session_id": f"turn-{chat}-{first}"}  # fmt: skip
    async with http.post(f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()


async def enqueue(servers: list[Served], chats: int, per_chat: int, per_turn: int) -> None:
    """Each chat's messages in turns one after another (so their order is known), rotating over
    the servers; the chats in parallel."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def one_chat(chat: int) -> None:
            for n, first in enumerate(range(0, per_chat, per_turn)):
                await send(http, servers[(chat + n) % len(servers)], str(100 + chat), first, per_turn)

        await asyncio.gather(*(one_chat(c) for c in range(chats)))


async def states(conn: asyncpg.Connection, total: int) -> dict[str, int]:
    """The outbox's rows by state, once every delivery result is stored (waiting up to 30 s)."""
    async with asyncio.timeout(30):
        while True:
            rows = await conn.fetch("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
            found = {r["state"]: r["n"] for r in rows}
            if found.get("delivered", 0) >= total:
                return found
            await asyncio.sleep(0.05)  # (the servers' last writes, polled with a deadline)


def expected(chat: int, per_chat: int) -> list[str]:
    return [f"{100 + chat}:{k}" for k in range(per_chat)]


async def test_a_thousand_messages_through_three_processes_arrive_once_in_order(
    tmp_path: Path, sender: Sender, telegram: tuple[FakeTelegram, str], pg_url: str
) -> None:
    """1,000 messages to 20 chats, enqueued through three servers: each arrives once, in order per chat."""
    fake, url = telegram
    async with three_servers(tmp_path, sender, url, pg_url, lease=30) as servers:
        await enqueue(servers, chats=20, per_chat=50, per_turn=10)
        await fake.until(lambda: len(fake.sent) >= 1000, within=120)
        conn = await asyncpg.connect(pg_url)
        try:
            stored = await states(conn, 1000)
        finally:
            await conn.close()
    for chat in range(20):
        assert fake.texts(100 + chat) == expected(chat, 50), f"chat {100 + chat}"
    assert len(fake.sent) == 1000
    assert stored == {"delivered": 1000}


async def test_kill_9_of_the_delivering_process_loses_nothing(
    tmp_path: Path, sender: Sender, telegram: tuple[FakeTelegram, str], pg_url: str
) -> None:
    """kill -9 of a server mid-delivery: its chats resume on another after the lease; nothing is
    lost, order holds, and at most the message under way is sent twice."""
    fake, url = telegram
    fake.send_delay = 0.02  # a slow platform
    # The first send gets a 429: every server holds Telegram for a while (the hold is shared), so
    # the messages are all enqueued before delivery is under way.
    fake.failures.append(Failure(429, "Too Many Requests: retry after 10", retry_after=10))
    chats, per_chat = 6, 40
    async with three_servers(tmp_path, sender, url, pg_url, lease=1.0) as servers:
        await enqueue(servers, chats=chats, per_chat=per_chat, per_turn=10)
        fake.hold_after = len(fake.sent) + 1  # every send from here on waits: "mid-delivery"
        await fake.until(lambda: fake.parked >= 1, within=30)
        conn = await asyncpg.connect(pg_url)
        try:
            holders = await conn.fetch(
                "SELECT DISTINCT l.holder FROM outbox_lanes l JOIN outbox o USING (channel, chat_id) "
                "WHERE o.state = 'pending' AND l.expires_at > now()"
            )
            victim_pid = int(holders[0]["holder"].split(":")[1])
            victim = next(s for s in servers if s.proc.pid == victim_pid)
            victim_lanes = await conn.fetchval(
                "SELECT COUNT(*) FROM outbox_lanes WHERE holder = $1", holders[0]["holder"]
            )
            os.kill(victim_pid, signal.SIGKILL)
            await victim.proc.wait()
            fake.release.set()
            total = chats * per_chat
            await fake.until(lambda: len({m["visible"] for m in fake.sent}) >= total, within=60)
            stored = await states(conn, total)
        finally:
            await conn.close()
        assert all(s.proc.returncode is None for s in servers if s is not victim)  # the others run on
    assert stored == {"delivered": total}
    repeated = 0
    for chat in range(chats):
        texts = fake.texts(100 + chat)
        once = [t for i, t in enumerate(texts) if i == 0 or texts[i - 1] != t]  # a repeat is adjacent
        assert once == expected(chat, per_chat), f"chat {100 + chat}"
        repeated += len(texts) - len(once)
    assert repeated <= victim_lanes  # at most the one under way in each of the victim's chats


async def cli(config: Path, *args: str) -> tuple[int, str]:
    """`nanobot outbox ARGS -c CONFIG` as a real process; its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanobot", "outbox", *args, "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def one_row(pg_url: str, wanted: str) -> asyncpg.Record:
    """The first outbox row matching the SQL condition ``wanted`` (polled with a deadline)."""
    conn = await asyncpg.connect(pg_url)
    try:
        async with asyncio.timeout(30):
            while (row := await conn.fetchrow(f"SELECT * FROM outbox WHERE {wanted}")) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # (another process's write, polled with a deadline)
        return row
    finally:
        await conn.close()


async def test_outbox_cli_acts_on_the_shared_outbox_and_wakes_the_servers(
    tmp_path: Path, sender: Sender, telegram: tuple[FakeTelegram, str], pg_url: str
) -> None:
    """`nanobot outbox list|retry|drop` on PostgreSQL: a retried message is sent at once by a
    running server, a dropped one never; the servers are told through NOTIFY, no pid file."""
    fake, url = telegram
    servers_up = three_servers(tmp_path, sender, url, pg_url, lease=30)
    async with servers_up as servers, aiohttp.ClientSession() as http:
        config = tmp_path / "a" / "config.json"
        fake.failures.append(Failure(403, "Forbidden: bot was blocked by the user"))
        await send(http, servers[0], "100", 0, 1)
        failed = await one_row(pg_url, "state = 'failed'")
        code, listing = await cli(config, "list")
        assert code == 0 and "failed" in listing and "100:0" in listing and "blocked" in listing
        assert "pg-Secret" not in listing
        code, said = await cli(config, "retry", str(failed["id"]))
        assert code == 0 and said.startswith(f"retry {failed['id']}: pending; every nanobot serve on "), said
        await fake.until(lambda: fake.texts("100") == ["100:0"], within=30)

        fake.failures.append(Failure(429, "Too Many Requests: retry after 3600", retry_after=3600))
        await send(http, servers[1], "101", 0, 1)
        waiting = await one_row(pg_url, "state = 'pending' AND attempts = 1")
        code, said = await cli(config, "drop", str(waiting["id"]))
        assert code == 0 and said.startswith(f"drop {waiting['id']}: dropped; every nanobot serve"), said
        # (the server that enqueued it claimed its free chat lane, so it is the one that skips it)
        await servers[1].wait_log(f"message {waiting['id']} was dropped by hand", within=30)
        assert fake.texts("101") == []
        code, listing = await cli(config, "list")
        assert code == 0 and listing.strip() == "the outbox is empty"
        assert (await cli(config, "retry", "99999"))[0] == 1
        assert not any((tmp_path / name / "ws" / "nanobot.pid").exists() for name in "abc")


def test_outbox_cli_with_an_unreachable_database_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """`nanobot outbox list` whose PostgreSQL cannot be reached: one line, no password, exit 2."""
    port = free_port()  # (nothing listens there)
    config = tmp_path / "config.json"
    url = f"postgresql://bot:Unused-Secret-9@127.0.0.1:{port}/nanobot"
    config.write_bytes(orjson.dumps({"storage": {"url": url, "connectTimeout": 5}}))
    done = subprocess.run([sys.executable, "-m", "nanobot", "outbox", "list", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"127.0.0.1:{port}/nanobot" in lines[0] and "Unused-Secret" not in done.stderr + done.stdout
