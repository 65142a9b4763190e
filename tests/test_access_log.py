"""The access log (api.accessLog): one line per request with its x-request-id, route template,
status, bytes and time, and never a query string, a header or a body."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import pytest

Start = Callable[..., Awaitable[str]]
KEY = "sk-client-key-for-the-log"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nanobot.access"]


async def raw_request(url: str, data: bytes) -> bytes:
    """Send ``data`` as is on a fresh connection; what came back."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(data)
    answer = await reader.read()
    writer.close()
    return answer


async def test_one_line_per_request_with_its_id_and_no_query_or_credentials(
    start_gateway: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request logs one line naming its method, raw path (query dropped), route template,
    status, bytes sent (headers included) and x-request-id; no header or query value appears."""
    gw = await start_gateway({"api": {"accessLog": True, "apiKey": KEY}})
    caplog.set_level(logging.INFO, logger="nanobot.access")
    auth = {"Authorization": f"Bearer {KEY}"}
    host = urlsplit(gw).netloc
    models_answer = await raw_request(
        gw,
        f"GET /v1/models?token=query-value-xyz HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        "x-request-id: trace-123\r\nConnection: close\r\n\r\n".encode(),
    )
    assert models_answer.startswith(b"HTTP/1.1 200 OK\r\n")
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{gw}/v1/sessions/my-session", headers={"Authorization": "Bearer wrong-key-abc"}
        ) as r:
            assert r.status == 401
            refused_id = r.headers["x-request-id"]
        async with s.post(
            f"{gw}/v1/chat/completions",
            headers={**auth, "x-request-id": "stream-9"},
            json={"stream": True, "messages": [{"role": "user", "content": "private words"}]},
        ) as r:
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
    malformed = await raw_request(gw, b"GET /health HTTP/1.1\r\nHost: x\r\nBad\x01Header: y\r\n\r\n")
    assert malformed.split(b"\r\n")[0].endswith(b" 400 Bad Request")

    lines = access_lines(caplog)
    assert len(lines) == 4, lines
    models, refused, stream, bad = lines
    assert models.startswith("127.0.0.1 GET /v1/models 200 ")
    assert f" {len(models_answer)}B " in models and models.endswith(" route=/v1/models rid=trace-123")
    assert refused.startswith("127.0.0.1 GET /v1/sessions/my-session 401 ")
    assert refused.endswith(f" route=/v1/sessions/{{id}} rid={refused_id}")
    assert stream.startswith("127.0.0.1 POST /v1/chat/completions 200 ")
    assert stream.endswith(" route=/v1/chat/completions rid=stream-9")
    assert " 400 " in bad and " route=other " in bad  # answered by aiohttp before any route
    text = "\n".join(lines)
    for leaked in ("?", "token", "query-value-xyz", "wrong-key-abc", KEY, "Bearer", "private words"):
        assert leaked not in text


async def test_no_access_log_by_default(start_gateway: Start, caplog: pytest.LogCaptureFixture) -> None:
    """Without api.accessLog, requests log nothing (neither our line nor aiohttp's own)."""
    gw = await start_gateway()
    caplog.set_level(logging.INFO)
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/v1/models", "/nope"):
            async with s.get(f"{gw}{path}") as r:
                await r.read()
    assert not [r for r in caplog.records if r.name in ("nanobot.access", "aiohttp.access")]
