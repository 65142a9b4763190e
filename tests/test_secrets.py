"""Secrets stay secret: configured keys and tokens never reach a client's error or a log line, and
a malformed request is logged in one line without the client's raw header."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from nanobot.config import Config, parse_config
from nanobot.redact import config_secrets, redact, secrets_redacted

import fake_platforms as fp
from fake_llm import FakeLLM, Step

StartGateway = Callable[..., Awaitable[str]]
PROVIDER_KEY = "sk-upstream-0123456789abcdef"
CHAT = "/v1/chat/completions"


def leaky_upstream(fake_llm: FakeLLM) -> None:
    """Script an upstream that rejects the key and quotes it back (as OpenAI's own 401 does)."""
    quoted = f"Incorrect API key provided: {PROVIDER_KEY}. You can find your API key at ..."
    fake_llm.push(*[Step(status=401, error=quoted) for _ in range(5)])


async def test_upstream_quoting_the_key_does_not_leak_it(
    start_gateway: StartGateway, fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream error quoting the provider key reaches the client and the log with the key redacted."""
    url = await start_gateway({"providers": {"fake": {"apiKey": PROVIDER_KEY}}})
    body = {"messages": [{"role": "user", "content": "hi"}]}
    caplog.set_level(logging.DEBUG)
    leaky_upstream(fake_llm)
    async with aiohttp.ClientSession() as s:
        async with s.post(url + CHAT, json=body) as r:
            assert r.status >= 400
            text = await r.text()
            error = (await r.json())["error"]
        assert PROVIDER_KEY not in text
        assert "Incorrect API key provided: [redacted]" in error["message"]  # still says what happened
        leaky_upstream(fake_llm)
        async with s.post(url + CHAT, json={**body, "stream": True}) as r:
            events = (await r.read()).decode()
        assert "Incorrect API key provided" in events and PROVIDER_KEY not in events
    assert "turn on" in caplog.text  # the failure was logged ...
    assert PROVIDER_KEY not in caplog.text  # ... without the key


async def test_every_configured_secret_is_redacted_from_log_lines(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """While the gateway runs, any log line (message, args or traceback) naming a secret shows it redacted."""
    await start_gateway(
        {
            "api": {"apiKey": "client-key-0123456789"},
            "providers": {"fake": {"apiKey": PROVIDER_KEY, "extraHeaders": {"X-Org": "org-secret-42424242"}}},
            "channels": {"telegram": {"token": fp.TELEGRAM_TOKEN}, "discord": {"token": fp.DISCORD_TOKEN}},
        }
    )
    secrets = [
        PROVIDER_KEY,
        "client-key-0123456789",
        "org-secret-42424242",
        fp.TELEGRAM_TOKEN,
        fp.DISCORD_TOKEN,
    ]
    log = logging.getLogger("nanobot.test")
    with caplog.at_level(logging.INFO):
        log.warning("calling https://api.telegram.org/bot%s/getMe", fp.TELEGRAM_TOKEN)
        log.info(f"headers {PROVIDER_KEY} and org-secret-42424242")
        try:
            raise RuntimeError(f"refused client-key-0123456789 and {fp.DISCORD_TOKEN}")
        except RuntimeError:
            log.exception("failed")
    assert caplog.text.count("[redacted]") >= len(secrets)
    for secret in secrets:
        assert secret not in caplog.text
    assert "https://api.telegram.org/bot[redacted]/getMe" in caplog.text


def test_short_and_empty_values_are_not_treated_as_secrets() -> None:
    """A trivially short key would blank out ordinary words in every log line: it is left alone."""
    config = parse_config(
        {"api": {"apiKey": "k"}, "providers": {"p": {"apiKey": "", "extraHeaders": {"X-A": "yes"}}}}
    )
    assert config_secrets(config) == frozenset()
    with secrets_redacted(config_secrets(config)):
        assert redact("yes, k") == "yes, k"
    with secrets_redacted(["abcdefgh-1", "abcdefgh"]):  # the longer one is redacted whole
        assert redact("x abcdefgh-1 abcdefgh") == "x [redacted] [redacted]"
    assert redact("x abcdefgh-1") == "x abcdefgh-1"  # nothing active any more


async def test_malformed_request_is_logged_in_one_line_without_the_header(
    gateway: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad header byte gets a 400 and one log line naming the problem, no traceback quoting it."""
    split = urlsplit(gateway)
    assert split.hostname is not None and split.port is not None
    caplog.set_level(logging.DEBUG)
    for raw in (
        b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-client-SECRET\x01\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-client-SECRET"
        + b"x" * 9000
        + b"\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(split.hostname, split.port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    bad = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(bad) == 2
    assert all(r.exc_info is None and r.levelno == logging.WARNING for r in bad)
    assert "Invalid header value char" in bad[0].getMessage()
    assert "Traceback" not in caplog.text
    assert "sk-client-SECRET" not in caplog.text


def test_an_error_text_with_a_lone_surrogate_is_still_an_openai_error() -> None:
    """An error quoting a name that is not UTF-8 still answers in OpenAI shape, not a plain-text 500."""
    from nanobot.errors import RequestError
    from nanobot.gateway.errors import error_response

    resp = error_response(RequestError("unknown form field 'fil\udce5s'", param="fil\udce5s"))
    assert resp.status == 400
    body = orjson.loads(resp.body)  # type: ignore[arg-type]
    assert body["error"]["message"] == "unknown form field 'fil\\udce5s'"
    assert body["error"]["param"] == "fil\\udce5s"


async def test_malformed_request_gets_an_openai_error_from_the_real_server(
    make_config: Callable[..., Config],
) -> None:
    """The server `nanobot serve` runs answers aiohttp's own 400s (bad header bytes, oversized
    headers) in OpenAI error shape with an x-request-id, not a plain-text page."""
    from aiohttp import web

    from nanobot.gateway.connections import make_runner
    from nanobot.runtime import build_app

    config = make_config()
    runner = make_runner(build_app(config), config.api)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        for raw in (
            b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-client-SECRET\x01\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 9000 + b"\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request"), head
            assert b"content-type: application/json" in head.lower() and b"x-request-id: req_" in head
            error = orjson.loads(body)["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "bad_request"
            assert error["message"].startswith("malformed HTTP request: ")
            assert b"SECRET" not in body
    finally:
        await runner.cleanup()
