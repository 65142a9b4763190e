"""Telegram webhook mode (``channels.telegram.webhook``): Telegram POSTs updates to a route of the
gateway, each call proven by its secret token; a retried update is handled once; nobody polls."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from nanobot.redact import config_secrets

from fake_llm import FakeLLM, last_user_text
from fake_platforms import FakeTelegram, telegram_section

SECRET = "webhook_Secret-4242"
ROUTE = "/hooks/telegram"
PUBLIC = "bot.example.test"  # the public name: not in api.allowedHosts
GOOD = {"Host": PUBLIC, "X-Telegram-Bot-Api-Secret-Token": SECRET}
API_KEY = "sk-gateway-key-1"


def update(update_id: int, text: str, chat_id: int = 5) -> dict[str, Any]:
    """A Telegram Update with a private text message."""
    message = {"message_id": update_id, "from": {"id": 7, "is_bot": False, "first_name": "T"},
               "chat": {"id": chat_id, "type": "private"}, "date": 0, "text": text}  # fmt: skip
    return {"update_id": update_id, "message": message}


async def turns_for(fake_llm: FakeLLM, text: str, *, wait: bool = False) -> int:
    """How many turns the model was asked to answer ``text`` in (waiting for one, if ``wait``)."""
    async with asyncio.timeout(20):
        # (the agent's progress, polled with a deadline)
        while wait and not any(last_user_text(r) == text for r in fake_llm.requests):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return sum(last_user_text(r) == text for r in fake_llm.requests)


@pytest.fixture
async def telegram(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeTelegram:
    """The fake Bot API, its root URL in ``telegram.root``."""
    fake = FakeTelegram()
    fake.root = str((await aiohttp_server(fake.app)).make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def webhook_gateway(telegram: FakeTelegram, start_gateway: Callable[..., Awaitable[str]]) -> str:
    """A gateway with an API key whose Telegram channel runs in webhook mode; started once
    setWebhook was called."""
    section = telegram_section(telegram.root)  # type: ignore[attr-defined]
    section["webhook"] = {"url": f"https://{PUBLIC}{ROUTE}", "secret": SECRET}
    url = await start_gateway({"channels": {"telegram": section}, "api": {"apiKey": API_KEY}})
    await telegram.until(lambda: telegram.webhook is not None)
    return url


async def test_start_sets_the_webhook_and_never_polls(webhook_gateway: str, telegram: FakeTelegram) -> None:
    """Start-up registers the URL, the secret and the update kinds with Telegram; getUpdates is
    never called (Telegram would refuse it while a webhook is set)."""
    assert telegram.webhook == {"url": f"https://{PUBLIC}{ROUTE}", "secret_token": SECRET,
                                "allowed_updates": ["message"]}  # fmt: skip
    assert telegram.get_updates_calls == 0


async def test_calls_without_the_right_secret_are_refused(
    webhook_gateway: str, fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    """A call with no secret or a wrong one gets 403 and starts no turn; nothing logs a traceback."""
    async with aiohttp.ClientSession() as http:
        for headers in ({"Host": PUBLIC}, {**GOOD, "X-Telegram-Bot-Api-Secret-Token": SECRET[:-1]},
                        {**GOOD, "X-Telegram-Bot-Api-Secret-Token": SECRET + "x"}):  # fmt: skip
            async with http.post(f"{webhook_gateway}{ROUTE}", json=update(1, "forged"), headers=headers) as r:
                assert r.status == 403, await r.text()
                assert "Secret-Token" in (await r.json())["error"]["message"]
        async with http.post(f"{webhook_gateway}{ROUTE}", json=update(2, "real"), headers=GOOD) as r:
            assert r.status == 200, await r.text()
    assert await turns_for(fake_llm, "real", wait=True) == 1
    assert await turns_for(fake_llm, "forged") == 0
    assert "Traceback" not in caplog.text and SECRET not in caplog.text


async def test_a_retried_update_is_handled_once(webhook_gateway: str, fake_llm: FakeLLM) -> None:
    """Telegram sends an update again when it missed our answer: both calls get 200, one turn runs."""
    async with aiohttp.ClientSession() as http:
        for body in (update(10, "only once"), update(10, "only once"), update(11, "next one")):
            async with http.post(f"{webhook_gateway}{ROUTE}", json=body, headers=GOOD) as r:
                assert r.status == 200, await r.text()
    # Same chat, so turns run in order: once "next one" reached the model, a repeat would have too.
    assert await turns_for(fake_llm, "next one", wait=True) == 1
    assert await turns_for(fake_llm, "only once") == 1


async def test_the_route_accepts_the_public_host_and_nothing_else_does(webhook_gateway: str) -> None:
    """The webhook route needs its secret, not the API key, and takes the public Host; the API
    still refuses that Host (DNS rebinding) and wants its key, and a web page (any Origin) cannot
    call the webhook."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{webhook_gateway}/v1/models", headers={"Host": PUBLIC}) as r:
            assert r.status == 421
        async with http.get(f"{webhook_gateway}/v1/models") as r:
            assert r.status == 401
        async with http.post(f"{webhook_gateway}{ROUTE}", json=update(6, "no key"), headers=GOOD) as r:
            assert r.status == 200
        page = {**GOOD, "Origin": "https://evil.example"}
        async with http.post(f"{webhook_gateway}{ROUTE}", json=update(3, "page"), headers=page) as r:
            assert r.status == 403


async def test_bad_bodies_are_clean_errors(webhook_gateway: str) -> None:
    """Too large a body (declared or streamed) is 413, one that is not an Update is 400: never a 500."""
    big = orjson.dumps(update(4, "x" * (1024 * 1024)))

    async def streamed() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse it by
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    async with aiohttp.ClientSession() as http:
        bodies: list[tuple[Any, int]] = [(io.BytesIO(big), 413), (streamed(), 413), (b"not json", 400),
                                         (b'{"message": {}}', 400), (b"[1]", 400)]  # fmt: skip
        for body, status in bodies:
            async with http.post(f"{webhook_gateway}{ROUTE}", data=body, headers=GOOD) as r:
                assert r.status == status, await r.text()


@pytest.mark.parametrize(
    ("webhook", "says"),
    [
        ({"url": "https://bot.example.test/tg"}, "channels.telegram.webhook.secret: required"),
        ({"url": "http://bot.example.test/tg", "secret": SECRET}, "https://"),
        ({"url": "https://bot.example.test/tg", "secret": "has space in it ok"}, "A-Z, a-z, 0-9"),
        ({"url": "https://bot.example.test/tg", "secret": "short_secret"}, "16-256 characters"),
        ({"url": "https://bot.example.test/v1/x", "secret": SECRET}, "a path of its own"),
        ({"url": "https://bot.example.test", "secret": SECRET}, "a path of its own"),
        ({"secret": SECRET}, "channels.telegram.webhook.url: required"),
    ],
)
def test_webhook_config_errors_are_one_line_and_exit_2(
    tmp_path: Path, webhook: dict[str, str], says: str
) -> None:
    """A webhook without a secret, or with a plain-http URL, stops start-up with one line (exit 2)."""
    config = {"channels": {"telegram": {"enabled": True, "token": "1:abc", "webhook": webhook}},
              "agents": {"defaults": {"workspace": str(tmp_path / "ws")}}}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps(config))
    done = subprocess.run([sys.executable, "-m", "nanobot", "serve", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr
    assert "has space" not in done.stderr and SECRET not in done.stderr  # (a secret is never quoted)


def test_the_webhook_secret_is_a_secret(make_config: Callable[..., Any]) -> None:
    """The secret token is redacted from logs and errors like every configured secret, and not in
    the config's repr."""
    webhook = {"url": f"https://{PUBLIC}{ROUTE}", "secret": SECRET}
    config = make_config({"channels": {"telegram": {"enabled": True, "token": "1:abc", "webhook": webhook}}})
    assert SECRET in config_secrets(config) and SECRET not in repr(config)
    assert config.channels.webhook_routes == {ROUTE}


async def test_switching_back_to_polling_deletes_the_webhook(
    telegram: FakeTelegram, start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """A bot left in webhook mode polls again once the webhook is removed from the config: the
    webhook is deleted (Telegram refuses getUpdates while one is set) and messages get answered."""
    telegram.webhook = {"url": f"https://{PUBLIC}{ROUTE}", "secret_token": SECRET}  # from the last run
    await start_gateway({"channels": {"telegram": telegram_section(telegram.root)}})  # type: ignore[attr-defined]
    await telegram.push_text(5, 7, "polling again")
    assert await turns_for(fake_llm, "polling again", wait=True) == 1
    assert telegram.webhook is None
    assert ("deleteWebhook", {"drop_pending_updates": False}) in telegram.webhook_calls
