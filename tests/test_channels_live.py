"""A live server: channels that come up late, and `nanobot outbox` edits that reach it at once."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from nanobot.bus import DeliveryReceipt, MessageBus, OutboundKind, OutboundMessage
from nanobot.config import Config, parse_config
from nanobot.delivery.lifecycle import PID_FILE
from nanobot.delivery.outbox_cli import outbox_command
from nanobot.storage.outbox import OutboxEntry, State
from nanobot.storage.sqlite.outbox import connect, select

import fake_platforms as fp
from fake_llm import FakeLLM

ServerFactory = Callable[..., Awaitable[TestServer]]
Live = tuple[asyncio.subprocess.Process, Config]


@pytest.fixture
async def fake() -> fp.FakeTelegram:
    """A fresh fake Bot API."""
    return fp.FakeTelegram()




def cli(config: Config, *argv: str) -> str:
    """Run `nanobot outbox ARGV` (it must succeed) and return what it printed."""
    out = io.StringIO()
    assert outbox_command(config, list(argv), out) == 0, out.getvalue()
    return out.getvalue().strip()


# --------------------------------------------------------------------------- late starts


async def test_unreachable_channel_starts_later_and_delivers_what_was_held(
    fake: fp.FakeTelegram, telegram_url: str, tmp_path: Path
) -> None:
    """Telegram answering 502 at start keeps retrying; once up, held messages go out and polling starts."""
    fake.get_me_failures.extend([fp.Failure(502, "Bad Gateway")] * 3)
    fake.get_me_gate = asyncio.Event()  # the fourth getMe waits: the outage lasts until the test says
    bus = MessageBus()
    async with fp.running(fp.make_config(tmp_path, telegram=telegram_url), bus) as manager:
        assert manager.enabled == frozenset({"api"}) and manager.starting == frozenset({"telegram"})
        receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
        bus.publish_outbound(OutboundMessage("telegram", "9", "sent during the outage", receipt=receipt))
        assert await receipt == DeliveryReceipt("queued", "channel telegram is not reachable yet")
        await fake.until(lambda: fake.get_me_calls == 4)
        fake.get_me_gate.set()
        await fake.until(lambda: fake.texts("9") == ["sent during the outage"])
        assert "telegram" in manager.enabled and manager.starting == frozenset()
        await fake.push_text(chat_id=9, user_id=1, text="hello again")
        inbound = await asyncio.wait_for(bus.consume_inbound(), 10)
    assert (inbound.channel, inbound.chat_id, inbound.content) == ("telegram", "9", "hello again")


async def test_discord_unreachable_at_start_connects_later(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """Discord answering 503 to the token check is retried; then the Gateway connects and messages go out."""
    discord = fp.FakeDiscord()
    discord.me_failures.extend([fp.Failure(503, "Service Unavailable")] * 2)
    server = await aiohttp_server(discord.app, access_log=None)
    url = str(server.make_url("")).rstrip("/")
    discord.gateway_url = f"{url}/gateway"
    async with fp.running(fp.make_config(tmp_path, discord=url)) as manager:
        manager.dispatch(OutboundMessage("discord", "3001", "sent during the outage"))
        await discord.until(lambda: discord.contents("3001") == ["sent during the outage"])
        await discord.until(lambda: discord.ws is not None)
        assert "discord" in manager.enabled


async def test_refused_token_at_start_is_not_retried(
    fake: fp.FakeTelegram, telegram_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 401 on getMe keeps the channel down with one error line and no background retries."""
    fake.get_me_failures.append(fp.Failure(401, "Unauthorized"))
    with caplog.at_level(logging.INFO):
        async with fp.running(fp.make_config(tmp_path, telegram=telegram_url)) as manager:
            assert manager.enabled == frozenset({"api"}) and manager.starting == frozenset()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "rejected" in errors[0]
    assert "retrying" not in caplog.text and fake.get_me_calls == 1


# --------------------------------------------------------------------------- hand edits, live


def server_config(tmp_path: Path, fake_llm: FakeLLM, telegram_url: str, port: int) -> Path:
    """Write a `nanobot serve` config (fake LLM, fake Telegram, instant backoff); returns its path."""
    defaults = {"model": "test-model", "provider": "fake", "workspace": str(tmp_path / "ws")}
    config: dict[str, Any] = {
        "api": {"port": port},
        "agents": {"defaults": defaults},
        "providers": {"fake": {"apiBase": fake_llm.url, "apiKey": "sk-upstream"}},  # type: ignore[attr-defined]
        "channels": {"retryBaseSeconds": 0.001, "retryMaxSeconds": 0.01,
                     "telegram": fp.telegram_section(telegram_url)},
    }  # fmt: skip
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps(config))
    return path


def read_outbox(config: Config) -> list[OutboxEntry]:
    """Every outbox entry (read alongside the server, through WAL)."""
    path = config.agents.defaults.workspace_path / "outbox.db"
    if not path.exists():
        return []
    conn = connect(path)
    try:
        return select(conn)
    finally:
        conn.close()


async def wait_entry(
    config: Config, wanted: Callable[[OutboxEntry], bool], within: float = 30
) -> OutboxEntry:
    """Poll the outbox file, with a deadline, until an entry is as wanted; returns it."""
    async with asyncio.timeout(within):
        # Another process writes the file: there is no event to await, so poll with a deadline.
        while not (found := [e for e in read_outbox(config) if wanted(e)]):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return found[0]


@pytest.fixture
async def live(
    fake: fp.FakeTelegram, telegram_url: str, fake_llm: FakeLLM, tmp_path: Path, unused_tcp_port: int
) -> AsyncIterator[Live]:
    """A real `nanobot serve` process on the fake Telegram; yields (process, its config)."""
    path = server_config(tmp_path, fake_llm, telegram_url, unused_tcp_port)
    log_path = tmp_path / "serve.log"
    proc = await fp.start_serve(path, log_path)
    config = parse_config(orjson.loads(path.read_bytes()))
    try:
        await fake.until(lambda: fake.get_updates_calls > 0, within=30)
        yield proc, config
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
        sys.stderr.write(log_path.read_text(errors="replace")[-3000:])


async def test_retry_reaches_the_running_server(fake: fp.FakeTelegram, live: Live) -> None:
    """`outbox retry` of a failed reply makes the running server send it at once, no restart."""
    proc, config = live
    workspace = config.agents.defaults.workspace_path
    fake.failures.append(fp.Failure(403, "Forbidden: bot was blocked by the user"))
    await fake.push_text(chat_id=55, user_id=1, text="hi")
    failed = await wait_entry(config, lambda e: e.state == State.FAILED)
    assert (workspace / PID_FILE).read_text().strip() == str(proc.pid)
    said = cli(config, "retry", str(failed.id))
    assert said == f"retry {failed.id}: pending; the running server (pid {proc.pid}) will send it now"
    await fake.until(lambda: fake.texts(55) == ["echo: hi"], within=30)
    assert proc.returncode is None
    proc.terminate()
    await asyncio.wait_for(proc.wait(), 15)
    assert not (workspace / PID_FILE).exists()  # removed at a clean exit


async def test_dropped_message_is_never_sent_by_the_running_server(fake: fp.FakeTelegram, live: Live) -> None:
    """`outbox drop` of a reply waiting out a long retry_after: never sent; the chat's next reply is."""
    proc, config = live
    fake.failures.append(fp.Failure(429, "Too Many Requests", retry_after=3600))
    await fake.push_text(chat_id=55, user_id=1, text="first")
    waiting = await wait_entry(config, lambda e: e.attempts == 1 and e.state == State.PENDING)
    said = cli(config, "drop", str(waiting.id))
    assert said == f"drop {waiting.id}: dropped; the running server (pid {proc.pid}) will not send it"
    await fake.push_text(chat_id=55, user_id=1, text="second")
    await fake.until(lambda: fake.texts(55) == ["echo: second"], within=30)
    assert [e.content for e in read_outbox(config)] == ["echo: second"]


# --------------------------------------------------------------------------- stale pid files


@pytest.fixture
def bystander() -> Iterator[int]:
    """A live process that is not nanobot (SIGUSR1 would kill it); yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
        assert proc.poll() is None, "the bystander was signalled"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("content", ["bystander", "999999999", "not a pid", ""])
async def test_stale_pid_file_is_ignored(tmp_path: Path, bystander: int, content: str) -> None:
    """A pid file naming a dead, foreign or garbled pid is never signalled; the CLI still works."""
    config = fp.make_config(tmp_path)
    async with fp.running(config) as manager:
        manager.dispatch(OutboundMessage("telegram", "9", "held", OutboundKind.MESSAGE))
        await manager.wait_idle()
    (tmp_path / PID_FILE).write_text(str(bystander) if content == "bystander" else content)
    assert cli(config, "retry", "1") == "retry 1: pending; it will be sent at the next start of nanobot serve"
