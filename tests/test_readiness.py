"""GET /health/ready: 503 until storage is open, while it cannot commit and while shutting
down; 200 otherwise. /health stays a liveness check throughout."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from nanobot.bus import MessageBus
from nanobot.channels.api import ApiChannel
from nanobot.config import Config
from nanobot.gateway.app import create_app
from served import serve

from fake_llm import FakeLLM, Step

Start = Callable[..., Awaitable[str]]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
READY = {"status": "ready", "storage": {"sessions": "ok", "outbox": "ok"}}


async def ready(s: aiohttp.ClientSession, gw: str) -> tuple[int, dict[str, Any]]:
    async with s.get(f"{gw}/health/ready") as r:
        return r.status, await r.json()


async def test_not_ready_until_storage_is_open(
    aiohttp_server: Any, make_config: Callable[..., Config], start_gateway: Start
) -> None:
    """The gateway served before its runtime has opened the session store and outbox answers
    /health/ready with 503 "starting" (while /health is 200); the whole runtime is ready."""
    config = make_config()
    bare = await aiohttp_server(create_app(config, MessageBus(), ApiChannel()))
    url = str(bare.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as s:
        assert await ready(s, url) == (
            503,
            {"status": "starting", "storage": {"sessions": "starting", "outbox": "starting"}},
        )
        async with s.get(f"{url}/health") as r:
            assert r.status == 200
        gw = await start_gateway()
        assert await ready(s, gw) == (200, READY)


async def test_not_ready_while_a_store_cannot_commit(
    start_gateway: Start, tmp_path: Path, fake_llm: FakeLLM
) -> None:
    """When the outbox cannot be written (another program holds outbox.db's write lock) the failed
    commit makes /health/ready 503 "unavailable" and counts a storage error; the next commit that
    succeeds makes it ready again. (sessions.db is held in exclusive locking mode: no other
    program can take its lock; its failures flip the same state through the same code.)"""
    gw = await start_gateway()
    send = Step(tool_calls=[("message", {"content": "note", "channel": "slack", "chat_id": "1"})])
    holder = sqlite3.connect(tmp_path / "ws" / "outbox.db", isolation_level=None)
    try:
        async with aiohttp.ClientSession() as s:
            assert (await ready(s, gw))[0] == 200
            holder.execute("BEGIN IMMEDIATE")  # the write lock, held by someone else
            fake_llm.push(send, Step(text="done"))
            async with s.post(f"{gw}/v1/chat/completions", json=CHAT) as r:  # ~5 s: SQLite's busy wait
                assert r.status == 200
            tool_result = fake_llm.requests[-1]["messages"][-1]
            assert tool_result["role"] == "tool" and tool_result["content"].startswith("failed"), tool_result
            status, body = await ready(s, gw)
            assert (status, body["status"], body["storage"]["outbox"]) == (503, "unavailable", "failing")
            async with s.get(f"{gw}/health") as r:
                assert r.status == 200  # alive all the same
            async with s.get(f"{gw}/metrics") as r:
                text = await r.text()
            assert 'nanobot_storage_errors_total{store="outbox"} 1' in text
            assert "nanobot_ready 0" in text
            holder.execute("ROLLBACK")
            fake_llm.push(send, Step(text="done"))
            async with s.post(f"{gw}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            assert await ready(s, gw) == (200, READY)
    finally:
        holder.close()


async def test_not_ready_while_shutting_down(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """On SIGTERM, while running requests finish, /health/ready answers 503 "stopping" so a load
    balancer sends new requests elsewhere; /health still answers."""
    gate = asyncio.Event()
    fake_llm.push(Step(chunks=["first", " last"], gate=gate))
    url = fake_llm.url  # type: ignore[attr-defined]
    async with serve(tmp_path, url, {"shutdownGrace": 30}) as gw, aiohttp.ClientSession() as s:
        assert (await ready(s, gw.url))[0] == 200
        stream = await s.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True})
        while b'"first"' not in await stream.content.readline():
            pass
        gw.terminate()
        await gw.wait_log("shutting down: waiting up to 30 s for 1 running requests")
        status, body = await ready(s, gw.url)
        assert (status, body["status"]) == (503, "stopping")
        async with s.get(f"{gw.url}/health") as r:
            assert r.status == 200
        gate.set()
        assert (await asyncio.wait_for(stream.read(), 15)).endswith(b"data: [DONE]\n\n")
        assert await gw.exit_code() == 0


async def _ready_status(s: aiohttp.ClientSession, gw: str, wanted: int, failing: str = "") -> dict[str, Any]:
    """Poll /health/ready (with a deadline) until it answers ``wanted`` (and says the store
    ``failing`` is failing, if given); its body."""
    async with asyncio.timeout(30):
        while True:
            status, body = await ready(s, gw)
            if status == wanted and (not failing or body["storage"].get(failing) == "failing"):
                return body
            await asyncio.sleep(0.05)  # (the probe runs in the server: polled, with a deadline)


async def test_postgres_unreachable_is_not_ready_until_it_returns(
    start_gateway: Start, fake_llm: FakeLLM, pg_url: str
) -> None:
    """While the PostgreSQL database refuses connections (its sessions cut, new ones refused),
    /health/ready turns 503 on its own, with no request failing first, and chat requests get a
    503 with Retry-After; once the database accepts connections again, /health/ready is 200 and
    chat works, with no restart."""
    database = pg_url.rsplit("/", 1)[1]
    gw = await start_gateway({"storage": {"url": pg_url, "probeSeconds": 0.05}})
    admin = await asyncpg.connect(pg_url.rsplit("/", 1)[0] + "/postgres")  # (a database of its own)
    try:
        async with aiohttp.ClientSession() as s:
            assert (await ready(s, gw))[0] == 200
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                database,
            )
            # (the outbox, its connections cut too, may say so first: the sessions' probe follows)
            body = await _ready_status(s, gw, 503, failing="sessions")
            assert body["status"] == "unavailable", body
            async with s.post(f"{gw}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1", await r.text()
                assert (await r.json())["error"]["code"] == "storage_error"
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            assert (await _ready_status(s, gw, 200)) == READY
            fake_llm.push(Step(text="back"))
            async with s.post(f"{gw}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200, await r.text()
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
