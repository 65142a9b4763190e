"""The Discord channel against fake REST and Gateway servers, through the real manager and bus."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from nanobot.bus import DeliveryReceipt, InboundMessage, MessageBus, OutboundKind, OutboundMessage
from nanobot.channels import discord_gateway
from nanobot.config import Config

from fake_platforms import DISCORD_TOKEN, Failure, FakeDiscord, make_config, running

ServerFactory = Callable[..., Awaitable[TestServer]]
CHANNEL = "3001"


@pytest.fixture
async def fake(aiohttp_server: ServerFactory) -> FakeDiscord:
    """A running fake Discord (REST + Gateway)."""
    fake = FakeDiscord()
    server = await aiohttp_server(fake.app)
    fake.gateway_url = str(server.make_url("/gateway"))
    fake.base_url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return fake


def config_for(fake: FakeDiscord, tmp_path: Path, **kw: object) -> Config:
    """A config whose Discord channel points at ``fake``."""
    return make_config(tmp_path, discord=fake.base_url, **kw)  # type: ignore[attr-defined]


async def next_inbound(bus: MessageBus) -> InboundMessage:
    """The next message a channel published, within a deadline."""
    return await asyncio.wait_for(bus.consume_inbound(), 10)


async def test_message_is_posted_with_token_and_nonce(fake: FakeDiscord, tmp_path: Path) -> None:
    """A reply is posted to the channel, authorized as the bot, with a nonce Discord enforces."""
    bus = MessageBus()
    async with running(config_for(fake, tmp_path), bus) as manager:
        receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
        bus.publish_outbound(OutboundMessage("discord", CHANNEL, "Build **finished**", OutboundKind.MESSAGE,
                                             receipt=receipt))  # fmt: skip
        assert await receipt == DeliveryReceipt("sent")
        await manager.wait_idle()
    assert fake.contents(CHANNEL) == ["Build **finished**"]
    assert fake.messages[0]["nonce"]


async def test_long_message_is_split_under_2000(fake: FakeDiscord, tmp_path: Path) -> None:
    """A long message arrives as several messages under 2000 characters, nothing lost."""
    lines = [f"line {i}: " + "x" * 60 for i in range(100)]
    bus = MessageBus()
    async with running(config_for(fake, tmp_path), bus) as manager:
        bus.publish_outbound(OutboundMessage("discord", CHANNEL, "\n".join(lines)))
        await manager.wait_idle()
    parts = fake.contents(CHANNEL)
    assert len(parts) > 3 and all(len(p) <= 2000 for p in parts)
    assert "\n".join(parts).split("\n") == lines
    assert len({m["nonce"] for m in fake.messages}) == len(parts)


async def test_retry_after_lost_response_does_not_post_twice(fake: FakeDiscord, tmp_path: Path) -> None:
    """When Discord created a message but the answer was lost, the retry's nonce prevents a duplicate."""
    fake.lose_responses = 1
    bus = MessageBus()
    async with running(config_for(fake, tmp_path), bus) as manager:
        bus.publish_outbound(OutboundMessage("discord", CHANNEL, "exactly once"))
        await manager.wait_idle()
    assert fake.post_calls == 2
    assert fake.contents(CHANNEL) == ["exactly once"]


async def test_429_honours_retry_after(fake: FakeDiscord, tmp_path: Path) -> None:
    """A 429's JSON retry_after is waited out before the retry."""
    fake.failures.append(Failure(429, "You are being rate limited.", retry_after=0.3))
    bus = MessageBus()
    async with running(config_for(fake, tmp_path), bus) as manager:
        bus.publish_outbound(OutboundMessage("discord", CHANNEL, "patience"))
        await manager.wait_idle()
    assert fake.contents(CHANNEL) == ["patience"]
    assert fake.post_times[1] - fake.post_times[0] >= 0.28


async def test_empty_bucket_waits_for_reset(fake: FakeDiscord, tmp_path: Path) -> None:
    """X-RateLimit-Remaining: 0 makes the next post to that channel wait Reset-After."""
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": "0.3"}
    fake.failures.append(Failure(500, "flaky", headers=headers))
    bus = MessageBus()
    async with running(config_for(fake, tmp_path), bus) as manager:
        bus.publish_outbound(OutboundMessage("discord", CHANNEL, "after reset"))
        await manager.wait_idle()
    assert fake.contents(CHANNEL) == ["after reset"]
    assert fake.post_times[1] - fake.post_times[0] >= 0.28


async def test_403_fails(fake: FakeDiscord, tmp_path: Path) -> None:
    """Missing permissions fail the message at once."""
    fake.failures.append(Failure(403, "Missing Permissions"))
    bus = MessageBus()
    async with running(config_for(fake, tmp_path), bus):
        receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
        bus.publish_outbound(OutboundMessage("discord", CHANNEL, "no", OutboundKind.MESSAGE, receipt=receipt))
        result = await receipt
    assert result.status == "failed" and "Missing Permissions" in result.detail
    assert fake.post_calls == 1


async def test_gateway_identifies_and_delivers_messages(fake: FakeDiscord, tmp_path: Path) -> None:
    """IDENTIFY carries the token and the message-content intent; MESSAGE_CREATE reaches the bus."""
    bus = MessageBus()
    async with running(config_for(fake, tmp_path), bus):
        await fake.until(lambda: fake.ws is not None)
        await fake.dispatch_message(CHANNEL, "hello bot", author_id="42", username="alice")
        msg = await next_inbound(bus)
    [identify] = fake.identifies
    assert identify["token"] == DISCORD_TOKEN
    assert identify["intents"] & (1 << 15)
    assert (msg.channel, msg.chat_id, msg.content, msg.sender_id) == ("discord", CHANNEL, "hello bot", "42")
    assert msg.session_key == f"discord:{CHANNEL}"


async def test_gateway_ignores_bots_and_denied_users(
    fake: FakeDiscord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Our own messages, other bots', and users outside allowFrom never reach the agent."""
    bus = MessageBus()
    with caplog.at_level(logging.WARNING):
        async with running(config_for(fake, tmp_path, allow_from=["alice"]), bus):
            await fake.until(lambda: fake.ws is not None)
            await fake.dispatch_message(CHANNEL, "echo", author_id="999", username="fakebot", bot=True)
            await fake.dispatch_message(CHANNEL, "beep", author_id="77", username="otherbot", bot=True)
            await fake.dispatch_message(CHANNEL, "let me in", author_id="66", username="mallory")
            await fake.dispatch_message(CHANNEL, "hi", author_id="42", username="Alice")
            msg = await next_inbound(bus)
    assert msg.content == "hi"
    assert "66" in caplog.text and "@mallory" in caplog.text


async def test_heartbeats_carry_the_last_sequence(fake: FakeDiscord, tmp_path: Path) -> None:
    """The client heartbeats at HELLO's interval with the last sequence number it saw."""
    fake.heartbeat_interval_ms = 50
    async with running(config_for(fake, tmp_path)):
        await fake.until(lambda: fake.ws is not None)
        await fake.dispatch_message(CHANNEL, "bump the sequence")
        await fake.until(lambda: 2 in fake.heartbeats)


async def test_dropped_connection_resumes_and_replays(fake: FakeDiscord, tmp_path: Path) -> None:
    """After a drop the client RESUMEs with its session and sequence, and gets what it missed."""
    bus = MessageBus()
    async with running(config_for(fake, tmp_path), bus):
        await fake.until(lambda: fake.ws is not None)
        await fake.dispatch_message(CHANNEL, "before")
        assert (await next_inbound(bus)).content == "before"
        await fake.drop()
        await fake.dispatch_message(CHANNEL, "while away")  # sent to nobody: replayed on RESUME
        await fake.until(lambda: bool(fake.resumes))
        assert (await next_inbound(bus)).content == "while away"
    [resume] = fake.resumes
    assert (resume["session_id"], resume["seq"], resume["token"]) == ("fake-session-1", 2, DISCORD_TOKEN)
    assert len(fake.identifies) == 1
    assert fake.ended_sessions == []  # (stopped, it leaves the session resumable for its next start)


async def test_a_restarted_process_resumes_its_session(
    fake: FakeDiscord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process stopped (an upgrade, a SIGTERM) and started again RESUMEs its Gateway session:
    what was sent while it was down is replayed and answered, nothing twice. Started a third
    time after a refused RESUME (the session expired meanwhile), it identifies afresh."""
    config = config_for(fake, tmp_path)
    first = MessageBus()
    async with running(config, first):
        await fake.until(lambda: fake.ws is not None)
        await fake.dispatch_message(CHANNEL, "before")
        assert (await next_inbound(first)).content == "before"
    assert fake.ended_sessions == [] and fake.connections == 0
    saved = tmp_path / "discord-session.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert DISCORD_TOKEN not in saved.read_text()
    await fake.dispatch_message(CHANNEL, "while down")  # nobody connected: kept for a RESUME
    second = MessageBus()
    async with running(config, second):
        await fake.until(lambda: bool(fake.resumes))
        assert (await next_inbound(second)).content == "while down"
        await fake.dispatch_message(CHANNEL, "after")
        assert (await next_inbound(second)).content == "after"  # ("while down" was not handed on twice)
    [resume] = fake.resumes
    assert (resume["session_id"], resume["seq"]) == ("fake-session-1", 2)  # READY 1, "before" 2
    assert len(fake.identifies) == 1
    monkeypatch.setattr(discord_gateway, "INVALID_SESSION_WAIT", (0.0, 0.01))
    fake.session_id = "fake-session-expired"  # Discord forgot the session meanwhile
    third = MessageBus()
    async with running(config, third):
        await fake.until(lambda: len(fake.identifies) == 2)  # refused RESUME: a new session
        await fake.dispatch_message(CHANNEL, "on a new session")
        assert (await next_inbound(third)).content == "on a new session"
    assert len(fake.resumes) == 2
    assert "fake-session-expired" in saved.read_text()  # the new session is the one kept


async def test_reconnect_request_resumes(fake: FakeDiscord, tmp_path: Path) -> None:
    """An op 7 RECONNECT makes the client reconnect and resume."""
    async with running(config_for(fake, tmp_path)):
        await fake.until(lambda: fake.ws is not None)
        await fake.send_op(7)
        await fake.until(lambda: bool(fake.resumes) and fake.ws is not None)
    assert len(fake.identifies) == 1


async def test_invalid_session_identifies_again(
    fake: FakeDiscord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op 9 INVALID SESSION (not resumable) makes the client IDENTIFY afresh."""
    monkeypatch.setattr(discord_gateway, "INVALID_SESSION_WAIT", (0.0, 0.01))
    async with running(config_for(fake, tmp_path)):
        await fake.until(lambda: fake.ws is not None)
        await fake.send_op(9, False)
        await fake.until(lambda: len(fake.identifies) == 2)
    assert fake.resumes == []


async def test_bad_token_keeps_channel_down(
    fake: FakeDiscord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rejected token gives one error line without the token; the channel stays down."""
    fake.token = "something-else"
    with caplog.at_level(logging.INFO):
        async with running(config_for(fake, tmp_path)) as manager:
            assert "discord" not in manager.enabled
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "discord" in errors[0] and "rejected" in errors[0]
    assert DISCORD_TOKEN not in caplog.text


async def test_missing_heartbeat_ack_reconnects_and_resumes(fake: FakeDiscord, tmp_path: Path) -> None:
    """A connection whose heartbeats go unacknowledged is treated as dead and resumed."""
    fake.heartbeat_interval_ms = 50
    fake.ack_heartbeats = False
    async with running(config_for(fake, tmp_path)):
        await fake.until(lambda: bool(fake.resumes))
    assert len(fake.identifies) == 1
