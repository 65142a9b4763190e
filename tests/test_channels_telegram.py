"""The Telegram channel against a fake Bot API, through the real manager, outbox and bus."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from nanobot.bus import DeliveryReceipt, InboundMessage, MessageBus, OutboundKind, OutboundMessage
from nanobot.channels.telegram import TelegramChannel
from nanobot.config import Config, TelegramConfig
from nanobot.storage.outbox import State
from nanobot.storage.sqlite.outbox import connect, select

from fake_platforms import TELEGRAM_TOKEN, Failure, FakeTelegram, make_config, running

ServerFactory = Callable[..., Awaitable[TestServer]]
CHAT = "777"


@pytest.fixture
async def fake() -> FakeTelegram:
    """A fresh fake Bot API."""
    return FakeTelegram()


@pytest.fixture
async def config(fake: FakeTelegram, aiohttp_server: ServerFactory, tmp_path: Path) -> Config:
    """A config whose Telegram channel points at the running fake."""
    server = await aiohttp_server(fake.app)
    return make_config(tmp_path, telegram=str(server.make_url("")).rstrip("/"))


def send(bus: MessageBus, text: str, chat: str = CHAT) -> asyncio.Future[DeliveryReceipt]:
    """Publish a `message`-tool send to Telegram and return its receipt."""
    receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
    bus.publish_outbound(OutboundMessage("telegram", chat, text, OutboundKind.MESSAGE, receipt=receipt))
    return receipt


def states(config: Config) -> list[tuple[State, str]]:
    """Every outbox entry's state and last error, oldest first."""
    conn = connect(config.agents.defaults.workspace_path / "outbox.db")
    try:
        return [(e.state, e.last_error) for e in select(conn)]
    finally:
        conn.close()


async def test_reply_is_delivered_as_html(fake: FakeTelegram, config: Config) -> None:
    """An agent reply reaches the chat, Markdown rendered as Telegram HTML."""
    bus = MessageBus()
    async with running(config, bus) as manager:
        assert "telegram" in manager.enabled
        bus.publish_outbound(OutboundMessage("telegram", CHAT, "Hello **there** & `you`"))
        await fake.until(lambda: len(fake.sent) == 1)
        await manager.wait_idle()
    assert fake.sent[0]["parse_mode"] == "HTML"
    assert fake.sent[0]["text"] == "Hello <b>there</b> &amp; <code>you</code>"
    assert fake.texts(CHAT) == ["Hello there & you"]
    assert states(config) == [(State.DELIVERED, "")]


async def test_message_tool_receipt_says_sent(fake: FakeTelegram, config: Config) -> None:
    """The `message` tool learns its message was sent after the first attempt."""
    bus = MessageBus()
    async with running(config, bus):
        assert await send(bus, "Build finished") == DeliveryReceipt("sent")
    assert fake.texts(CHAT) == ["Build finished"]


async def test_long_message_is_split_with_fences_reopened(fake: FakeTelegram, config: Config) -> None:
    """A message over 4096 characters arrives as several, each a valid message with balanced code."""
    code = "\n".join(f"value_{i} = compute({i})  # step {i}" for i in range(400))
    text = f"Intro paragraph.\n\n```python\n{code}\n```\n\nThat is all."
    bus = MessageBus()
    async with running(config, bus) as manager:
        bus.publish_outbound(OutboundMessage("telegram", CHAT, text))
        await manager.wait_idle()
    assert len(fake.sent) > 2
    assert all(m["text"].count("<pre>") == m["text"].count("</pre>") for m in fake.sent)
    shown = "\n".join(fake.texts(CHAT))
    assert all(f"value_{i} = compute({i})" in shown for i in range(400))
    assert fake.texts(CHAT)[-1].endswith("That is all.")


async def test_rejected_markup_falls_back_to_plain_text(fake: FakeTelegram, config: Config) -> None:
    """When Telegram cannot parse the HTML, the same text is sent again without markup."""
    fake.failures.append(Failure(400, "Bad Request: can't parse entities: unsupported start tag"))
    bus = MessageBus()
    async with running(config, bus):
        assert await send(bus, "**Build** finished") == DeliveryReceipt("sent")
    assert fake.send_calls == 2
    assert fake.sent[0]["text"] == "**Build** finished"
    assert "parse_mode" not in fake.sent[0]


async def test_429_waits_retry_after(fake: FakeTelegram, config: Config) -> None:
    """A 429 is retried after Telegram's retry_after (not the shorter backoff), and the receipt says when."""
    fake.failures.append(Failure(429, "Too Many Requests: retry after 1", retry_after=1))
    bus = MessageBus()
    async with running(config, bus) as manager:
        receipt = await send(bus, "hello")
        assert receipt.status == "queued" and receipt.detail.startswith("will retry in 1 s: "), receipt
        await manager.wait_idle()
    assert fake.texts(CHAT) == ["hello"]


async def test_5xx_is_retried(fake: FakeTelegram, config: Config) -> None:
    """Server errors are retried with backoff until the message gets through."""
    fake.failures.extend([Failure(502, "Bad Gateway"), Failure(500, "Internal Server Error")])
    bus = MessageBus()
    async with running(config, bus) as manager:
        bus.publish_outbound(OutboundMessage("telegram", CHAT, "persist"))
        await manager.wait_idle()
    assert fake.send_calls == 3
    assert fake.texts(CHAT) == ["persist"]


async def test_403_fails_without_retry(fake: FakeTelegram, config: Config) -> None:
    """A 403 (bot blocked) fails at once, keeps the error, and later messages still go out."""
    fake.failures.append(Failure(403, "Forbidden: bot was blocked by the user"))
    bus = MessageBus()
    async with running(config, bus) as manager:
        receipt = await send(bus, "first")
        assert receipt.status == "failed" and "bot was blocked" in receipt.detail
        bus.publish_outbound(OutboundMessage("telegram", CHAT, "second"))
        await manager.wait_idle()
    assert fake.texts(CHAT) == ["second"]
    assert states(config)[0] == (
        State.FAILED,
        "telegram sendMessage: Forbidden: bot was blocked by the user (403)",
    )


async def test_gives_up_after_max_attempts(
    fake: FakeTelegram, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """After channels.maxAttempts retryable failures the message is failed with the last error."""
    server = await aiohttp_server(fake.app)
    config = make_config(tmp_path, telegram=str(server.make_url("")).rstrip("/"), maxAttempts=3)
    fake.failures.extend(Failure(500, f"boom {i}") for i in range(5))
    bus = MessageBus()
    async with running(config, bus) as manager:
        bus.publish_outbound(OutboundMessage("telegram", CHAT, "doomed"))
        await manager.wait_idle()
    assert fake.send_calls == 3
    [(state, error)] = states(config)
    assert state == State.FAILED and "boom 2" in error


async def test_inbound_text_reaches_the_bus(fake: FakeTelegram, config: Config) -> None:
    """A user's text message becomes an InboundMessage for the session telegram:<chat id>."""
    bus = MessageBus()
    async with running(config, bus):
        await fake.push_text(chat_id=4242, user_id=17, text="hi bot", username="alice")
        msg = await asyncio.wait_for(bus.consume_inbound(), 10)
    assert (msg.channel, msg.chat_id, msg.content, msg.sender_id) == ("telegram", "4242", "hi bot", "17")
    assert msg.session_key == "telegram:4242"
    assert msg.metadata["username"] == "alice"


async def test_allow_from_denies_and_logs_the_sender(
    fake: FakeTelegram, aiohttp_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Senders not in allowFrom are ignored, and the log names their id and username."""
    server = await aiohttp_server(fake.app)
    config = make_config(tmp_path, telegram=str(server.make_url("")).rstrip("/"), allow_from=["@Bob"])
    bus = MessageBus()
    with caplog.at_level(logging.WARNING):
        async with running(config, bus):
            await fake.push_text(chat_id=1, user_id=66, text="let me in", username="mallory")
            await fake.push_text(chat_id=2, user_id=55, text="hello", username="bob")
            msg = await asyncio.wait_for(bus.consume_inbound(), 10)
    assert (msg.sender_id, msg.content) == ("55", "hello")
    assert "66" in caplog.text and "@mallory" in caplog.text and "allowFrom" in caplog.text


async def test_empty_allow_from_denies_everyone(
    fake: FakeTelegram, aiohttp_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With an empty allowFrom no message reaches the agent."""
    server = await aiohttp_server(fake.app)
    config = make_config(tmp_path, telegram=str(server.make_url("")).rstrip("/"), allow_from=[])
    bus = MessageBus()
    with caplog.at_level(logging.WARNING):
        async with running(config, bus):
            await fake.push_text(chat_id=1, user_id=66, text="hi", username="carol")
            await fake.handled()
    bus.publish_inbound(InboundMessage("marker", "0"))
    assert (await bus.consume_inbound()).channel == "marker"  # nothing was published before it
    assert "66" in caplog.text and "@carol" in caplog.text


async def test_bad_token_keeps_channel_down_with_one_error(
    fake: FakeTelegram, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """A rejected token gives one error line; the channel stays down and its messages are held."""
    fake.token = "other:token"
    bus = MessageBus()
    with caplog.at_level(logging.INFO):
        async with running(config, bus) as manager:
            assert manager.enabled == frozenset({"api"})
            receipt = await send(bus, "hello")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "telegram" in errors[0].getMessage() and "rejected" in errors[0].getMessage()
    assert receipt == DeliveryReceipt("queued", "channel telegram is not enabled")
    assert fake.sent == []


async def test_token_never_appears_in_logs_errors_or_repr(
    fake: FakeTelegram, config: Config, caplog: pytest.LogCaptureFixture, unused_tcp_port: int
) -> None:
    """The bot token (part of every URL) never shows up in logs, receipts, errors or repr."""
    fake.failures.extend([Failure(500, "oops"), Failure(403, "Forbidden")])
    bus = MessageBus()
    with caplog.at_level(logging.DEBUG):
        async with running(config, bus) as manager:
            receipts = [await send(bus, "a"), await send(bus, "b")]
            await manager.wait_idle()  # so "c" is not queued behind them: its receipt is its own attempt
            fake.redirect_loop = True  # aiohttp's TooManyRedirects names the URL, token included
            receipts.append(await send(bus, "c"))
            fake.redirect_loop = False
            await manager.wait_idle()
        closed_port = f"http://127.0.0.1:{unused_tcp_port}"
        dead = TelegramChannel(TelegramConfig(enabled=True, token=TELEGRAM_TOKEN, api_base=closed_port), bus)
        with pytest.raises(Exception) as info:
            await dead.start()
        await dead.stop()
    # aiohttp.access records come from the fake server (Telegram's side of the wire).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
    texts = [ours, repr(dead), str(info.value), repr(info.value), *map(str, receipts), repr(config)]
    assert "network error" in str(info.value)
    assert "TooManyRedirects" in receipts[2].detail and "/bot<token>/sendMessage" in receipts[2].detail
    assert fake.texts(CHAT) == ["b", "c"]
    for text in texts:
        assert TELEGRAM_TOKEN not in text
        assert TELEGRAM_TOKEN.split(":")[1] not in text


async def test_a_rate_limited_chat_does_not_block_others(fake: FakeTelegram, config: Config) -> None:
    """While one chat waits out a 429, messages to another chat keep flowing."""
    fake.failures.append(Failure(429, "Too Many Requests: retry after 1", retry_after=1))
    bus = MessageBus()
    async with running(config, bus) as manager:
        bus.publish_outbound(OutboundMessage("telegram", "1", "to chat one"))
        await fake.until(lambda: fake.send_calls >= 1)
        bus.publish_outbound(OutboundMessage("telegram", "2", "to chat two"))
        await manager.wait_idle()
    assert [m["visible"] for m in fake.sent] == ["to chat two", "to chat one"]
