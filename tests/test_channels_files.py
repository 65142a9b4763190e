"""Files sent on Telegram and Discord, end to end: through the upload pipeline to the agent, or refused."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from nanobot.bus import MessageBus

import fake_platforms as fp
import samples
from fake_llm import FakeLLM, Step

ServerFactory = Callable[..., Awaitable[TestServer]]
StartGateway = Callable[..., Awaitable[str]]
LIMIT = 1024 * 1024  # api.maxFileBytes in these tests: "1 MiB" in refusals
CHAT = 4242


def gateway_config(max_files: int = 4, **sections: dict[str, Any]) -> dict[str, Any]:
    """Config for ``start_gateway``: small upload limits, instant outbox backoff, the given channels."""
    channels = {"retryBaseSeconds": 0.001, "retryMaxSeconds": 0.01, **sections}
    return {"api": {"maxFileBytes": LIMIT, "maxFiles": max_files}, "channels": channels}


async def serve_fake(owner: fp.FakeTelegram | fp.FakeDiscord, aiohttp_server: ServerFactory) -> str:
    """Run a fake platform on loopback; returns its base URL."""
    server = await aiohttp_server(owner.app, access_log=None)
    return str(server.make_url("")).rstrip("/")


def user_contents(llm: FakeLLM) -> list[Any]:
    """The content of the last user message of every request the fake LLM received, in order."""
    return [[m for m in r["messages"] if m["role"] == "user"][-1]["content"] for r in llm.requests]


@pytest.fixture
async def telegram(aiohttp_server: ServerFactory) -> tuple[fp.FakeTelegram, str]:
    """A fake Telegram on loopback, and its URL."""
    fake = fp.FakeTelegram()
    return fake, await serve_fake(fake, aiohttp_server)


@pytest.fixture
async def discord(aiohttp_server: ServerFactory) -> tuple[fp.FakeDiscord, str]:
    """A fake Discord on loopback (its attachments served from the api_base origin), and its URL."""
    fake = fp.FakeDiscord()
    url = await serve_fake(fake, aiohttp_server)
    fake.gateway_url = f"{url}/gateway"
    return fake, url


async def start_telegram(
    start_gateway: StartGateway, telegram: tuple[fp.FakeTelegram, str], allow: list[str] | None = None
) -> fp.FakeTelegram:
    """Start the gateway with Telegram on, and wait until it polls."""
    fake, url = telegram
    await start_gateway(gateway_config(telegram=fp.telegram_section(url, allow)))
    await fake.until(lambda: fake.get_updates_calls > 0)
    return fake


async def start_discord(
    start_gateway: StartGateway, discord: tuple[fp.FakeDiscord, str], allow: list[str] | None = None,
    max_files: int = 4,
) -> fp.FakeDiscord:  # fmt: skip
    """Start the gateway with Discord on, and wait until the Gateway session is up."""
    fake, url = discord
    await start_gateway(gateway_config(max_files, discord=fp.discord_section(url, allow)))
    await fake.until(lambda: fake.ws is not None)
    return fake


async def refusal(fake: fp.FakeTelegram, chat: int = CHAT) -> str:
    """Wait for the one reply in ``chat`` and return it."""
    await fake.until(lambda: len(fake.texts(chat)) == 1)
    return fake.texts(chat)[0]


# --------------------------------------------------------------------------- Telegram


async def test_telegram_pdf_with_caption_reaches_the_agent_as_text(
    start_gateway: StartGateway, telegram: tuple[fp.FakeTelegram, str], fake_llm: FakeLLM
) -> None:
    """A PDF document with a caption reaches the model as the caption plus a [File: ...] block."""
    fake = await start_telegram(start_gateway, telegram)
    fake_llm.push(Step(text="Revenue grew."))
    fake.add_document(CHAT, 17, samples.make_pdf(["Quarterly revenue grew twelve percent"]), "report.pdf",
                      caption="Summarize this")  # fmt: skip
    await fake.changed()
    await fake.until(lambda: fake.texts(CHAT) == ["Revenue grew."])
    (content,) = user_contents(fake_llm)
    assert content.startswith("Summarize this\n\n[File: report.pdf]\n")
    assert "Quarterly revenue grew twelve percent" in content


async def test_telegram_photo_reaches_the_agent_as_an_image_and_history_keeps_a_placeholder(
    start_gateway: StartGateway, telegram: tuple[fp.FakeTelegram, str], fake_llm: FakeLLM
) -> None:
    """A photo (largest size) reaches the model as an image_url part; later history has [image: ...]."""
    fake = await start_telegram(start_gateway, telegram)
    big = fake.add_photo(CHAT, 17, samples.make_png(), caption="What is this?")
    await fake.changed()
    await fake.until(lambda: len(fake.texts(CHAT)) == 1)
    assert fake.get_file_calls == [big]  # only the largest size is fetched
    (parts,) = user_contents(fake_llm)
    assert parts[0] == {"type": "text", "text": "What is this?"}
    assert parts[1]["type"] == "image_url"
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")

    await fake.push_text(CHAT, 17, "and now?")
    await fake.until(lambda: len(fake.texts(CHAT)) == 2)
    history = [m["content"] for m in fake_llm.requests[-1]["messages"] if m["role"] == "user"]
    assert history == ["What is this?\n\n[image: photo.jpg]", "and now?"]


async def test_telegram_oversized_file_is_refused_without_downloading(
    start_gateway: StartGateway, telegram: tuple[fp.FakeTelegram, str], fake_llm: FakeLLM
) -> None:
    """A document declared over the limit gets a reply naming the limit, and is never downloaded."""
    fake = await start_telegram(start_gateway, telegram)
    fake.add_document(CHAT, 17, b"%PDF-1.7 small", "huge.pdf", file_size=5 * LIMIT)
    await fake.changed()
    reply = await refusal(fake)
    assert "huge.pdf is 5 MiB" in reply and "the limit is 1 MiB per file" in reply
    assert fake.get_file_calls == [] and fake.files.downloads == []
    assert fake_llm.requests == []


async def test_telegram_unsupported_file_gets_a_415_style_reply(
    start_gateway: StartGateway, telegram: tuple[fp.FakeTelegram, str], fake_llm: FakeLLM
) -> None:
    """A binary file of no supported type is refused with the supported types, and no turn runs."""
    fake = await start_telegram(start_gateway, telegram)
    fake.add_document(CHAT, 17, bytes(range(256)) * 8, "blob.bin")
    await fake.changed()
    reply = await refusal(fake)
    assert "blob.bin: unsupported file type" in reply and "supported:" in reply
    assert fake_llm.requests == []


async def test_telegram_download_failure_is_reported_without_the_token(
    start_gateway: StartGateway,
    telegram: tuple[fp.FakeTelegram, str],
    fake_llm: FakeLLM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed download gets a "could not download" reply; neither the reply nor the log holds the token."""
    fake = await start_telegram(start_gateway, telegram)
    fake.files.status = 500
    with caplog.at_level(logging.DEBUG):
        fake.add_document(CHAT, 17, b"hello", "notes.txt")
        await fake.changed()
        reply = await refusal(fake)
    assert "could not download your file" in reply and "HTTP 500" in reply
    assert fp.TELEGRAM_TOKEN not in reply and fp.TELEGRAM_TOKEN not in caplog.text
    assert fake_llm.requests == []


async def test_telegram_denied_senders_file_is_never_downloaded(
    start_gateway: StartGateway, telegram: tuple[fp.FakeTelegram, str], fake_llm: FakeLLM
) -> None:
    """A file from a sender outside allowFrom is dropped before getFile; an allowed sender is answered."""
    fake = await start_telegram(start_gateway, telegram, allow=["17"])
    fake.add_document(CHAT, 66, samples.make_pdf(["secret"]), "intruder.pdf")
    fake.add_text(CHAT, 17, "hello")  # same chat: it would wait for the file if the file were taken
    await fake.changed()
    await fake.until(lambda: fake.texts(CHAT) == ["echo: hello"])
    assert fake.get_file_calls == [] and fake.files.downloads == []
    assert user_contents(fake_llm) == ["hello"]


async def test_telegram_messages_after_a_file_keep_their_order(
    start_gateway: StartGateway, telegram: tuple[fp.FakeTelegram, str], fake_llm: FakeLLM
) -> None:
    """A text sent right after a document reaches the agent after it, though the file takes longer."""
    fake = await start_telegram(start_gateway, telegram)
    fake.add_document(CHAT, 17, b"the meeting is at noon", "notes.txt", caption="read this")
    fake.add_text(CHAT, 17, "when is the meeting?")
    await fake.changed()
    await fake.until(lambda: len(fake.texts(CHAT)) == 2)
    first, second = user_contents(fake_llm)
    assert first == "read this\n\n[File: notes.txt]\nthe meeting is at noon"
    assert second == "when is the meeting?"


async def test_stopping_cancels_a_download_in_progress(
    telegram: tuple[fp.FakeTelegram, str], tmp_path: Path
) -> None:
    """Stopping the channels while a file downloads cancels it cleanly: nothing reaches the agent."""
    fake, url = telegram
    fake.files.gate = asyncio.Event()
    bus = MessageBus()
    async with fp.running(fp.make_config(tmp_path, telegram=url), bus):
        fake.add_document(CHAT, 17, b"slow file", "slow.txt")
        await fake.changed()
        await fake.until(lambda: fake.files.parked == 1)
    fake.files.gate.set()
    assert not [t for t in asyncio.all_tasks() if "FileIntake" in repr(t.get_coro())]
    assert not bus.drain_outbound()
    assert bus._inbound.empty()


# --------------------------------------------------------------------------- Discord


async def test_discord_pdf_attachment_is_answered_in_the_same_channel(
    start_gateway: StartGateway, discord: tuple[fp.FakeDiscord, str], fake_llm: FakeLLM
) -> None:
    """A PDF attachment from the api_base origin reaches the model as text; the reply lands in the channel."""
    fake = await start_discord(start_gateway, discord)
    fake_llm.push(Step(text="Noted."))
    pdf = fake.attachment(discord[1], "notes.pdf", samples.make_pdf(["Ship on Friday"]))
    await fake.dispatch_message("3001", "see attached", attachments=[pdf])
    await fake.until(lambda: fake.contents("3001") == ["Noted."])
    (content,) = user_contents(fake_llm)
    assert content.startswith("see attached\n\n[File: notes.pdf]\n") and "Ship on Friday" in content
    assert fake.files.downloads == ["notes.pdf"]


async def test_discord_attachment_from_an_untrusted_host_is_refused(
    start_gateway: StartGateway, discord: tuple[fp.FakeDiscord, str], fake_llm: FakeLLM
) -> None:
    """An attachment URL outside Discord's CDN and the api_base origin is never fetched; the user is told."""
    fake = await start_discord(start_gateway, discord)
    elsewhere = discord[1].replace("127.0.0.1", "localhost")  # the same server, another origin
    await fake.dispatch_message("3001", "", attachments=[fake.attachment(elsewhere, "x.pdf", b"%PDF-")])
    await fake.until(lambda: len(fake.contents("3001")) == 1)
    assert "x.pdf is not hosted on Discord" in fake.contents("3001")[0]
    assert fake.files.downloads == [] and fake_llm.requests == []


@pytest.mark.parametrize("stream", [False, True], ids=["content-length", "chunked"])
async def test_discord_file_larger_than_declared_is_cut_off_at_the_limit(
    start_gateway: StartGateway, discord: tuple[fp.FakeDiscord, str], fake_llm: FakeLLM, stream: bool
) -> None:
    """An attachment that declares a small size but is over the limit is refused while downloading."""
    fake = await start_discord(start_gateway, discord)
    fake.files.stream = stream
    big = fake.attachment(discord[1], "big.txt", b"a" * (2 * LIMIT), size=100)
    await fake.dispatch_message("3001", "", attachments=[big])
    await fake.until(lambda: len(fake.contents("3001")) == 1)
    told = "big.txt is too large" if stream else "big.txt is 2 MiB"  # cut off mid-body, or by its header
    assert f"{told}; the limit is 1 MiB per file" in fake.contents("3001")[0]
    assert fake_llm.requests == []


async def test_discord_too_many_attachments_are_refused(
    start_gateway: StartGateway, discord: tuple[fp.FakeDiscord, str], fake_llm: FakeLLM
) -> None:
    """More attachments than api.maxFiles are refused before any download."""
    fake = await start_discord(start_gateway, discord, max_files=1)
    files = [fake.attachment(discord[1], f"n{i}.txt", b"note") for i in range(2)]
    await fake.dispatch_message("3001", "two notes", attachments=files)
    await fake.until(lambda: len(fake.contents("3001")) == 1)
    assert "too many files: 2; at most 1 per message" in fake.contents("3001")[0]
    assert fake.files.downloads == [] and fake_llm.requests == []


async def test_discord_denied_senders_attachment_is_never_downloaded(
    start_gateway: StartGateway, discord: tuple[fp.FakeDiscord, str], fake_llm: FakeLLM
) -> None:
    """An attachment from an author outside allowFrom is dropped; an allowed author's message is answered."""
    fake = await start_discord(start_gateway, discord, allow=["42"])
    doc = fake.attachment(discord[1], "intruder.txt", b"let me in")
    await fake.dispatch_message("3001", "", author_id="66", username="mallory", attachments=[doc])
    await fake.dispatch_message("3001", "hello")
    await fake.until(lambda: fake.contents("3001") == ["echo: hello"])
    assert fake.files.downloads == [] and user_contents(fake_llm) == ["hello"]
