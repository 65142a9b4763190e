"""Browser safety: a web page cannot drive the agent (Origin, Sec-Fetch-Site, Host), CORS for the
listed origins, and the Bearer scheme in any case."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

import fake_platforms as fp
from conftest import MODEL
from fake_llm import FakeLLM, Step

StartGateway = Callable[..., Awaitable[str]]
ServerFactory = Callable[..., Awaitable[TestServer]]
EVIL = "http://evil.example"
APP = "https://app.example.com"
CHAT = "/v1/chat/completions"


def simple_bodies() -> list[tuple[str, Any]]:
    """The three CORS-"simple" request bodies a page may POST without a preflight."""
    form = aiohttp.FormData()
    form.add_field("message", "tell the team")
    return [
        (
            "text/plain",
            {
                "data": '{"messages":[{"role":"user","content":"tell the team"}]}',
                "headers": {"Content-Type": "text/plain"},
            },
        ),
        ("urlencoded", {"data": {"message": "tell the team"}}),
        ("multipart", {"data": form}),
    ]


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, Any] | None, CIMultiDict[str]]:
    """Status, JSON body (None when empty or not JSON) and headers of one request."""
    async with aiohttp.ClientSession() as s, s.request(method, url, **kwargs) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, body, r.headers.copy()


async def test_cross_origin_simple_posts_are_refused_before_any_turn(
    start_gateway: StartGateway, aiohttp_server: ServerFactory, fake_llm: FakeLLM
) -> None:
    """A page on another site POSTing text/plain, a form or multipart gets 403 and no `message` is sent."""
    telegram = fp.FakeTelegram()
    server = await aiohttp_server(telegram.app, access_log=None)
    tg_url = str(server.make_url("")).rstrip("/")
    args = {"content": "pwned", "channel": "telegram", "chat_id": "777"}
    url = await start_gateway({"channels": {"telegram": fp.telegram_section(tg_url)}})
    for name, kwargs in simple_bodies():
        fake_llm.push(Step(tool_calls=[("message", args)]), Step(text="done"))
        status, body, headers = await call(
            "POST", url + CHAT, headers={"Origin": EVIL, **kwargs.pop("headers", {})}, **kwargs
        )
        assert status == 403, name
        assert body is not None and body["error"]["type"] == "permission_error"
        assert EVIL in body["error"]["message"] and "api.corsOrigins" in body["error"]["message"]
        assert "Access-Control-Allow-Origin" not in headers and headers["x-request-id"]
    assert fake_llm.requests == []
    # The same request without Origin (curl) runs the turn: the check above could have seen a send.
    status, _, _ = await call("POST", url + CHAT, data={"message": "tell the team"})
    assert status == 200
    await telegram.until(lambda: telegram.texts("777") == ["pwned"])
    assert len(fake_llm.requests) == 2


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://localhost:1"},
        {"Origin": "http://127.0.0.1.evil.example"},
    ],
    ids=["null-origin", "sec-fetch-cross-site", "other-local-port", "lookalike"],
)
async def test_other_browser_requests_are_refused(
    gateway: str, fake_llm: FakeLLM, headers: dict[str, str]
) -> None:
    """An opaque origin, a no-cors cross-site request, or another local page gets 403, and no turn runs."""
    body = {"messages": [{"role": "user", "content": "hi"}]}
    status, data, _ = await call("POST", gateway + CHAT, json=body, headers=headers)
    assert status == 403 and data is not None and data["error"]["code"] == "forbidden"
    status, _, _ = await call("GET", gateway + "/v1/models", headers=headers)
    assert status == 403
    assert fake_llm.requests == []


async def test_same_origin_and_listed_origins_are_served(start_gateway: StartGateway) -> None:
    """The server's own page, and a page on a listed origin, get answers; the listed one can read them."""
    url = await start_gateway({"api": {"corsOrigins": [APP]}})
    body = {"messages": [{"role": "user", "content": "hi"}]}
    status, data, headers = await call("POST", url + CHAT, json=body, headers={"Origin": url})
    assert status == 200 and data is not None and "Access-Control-Allow-Origin" not in headers
    cross = {"Origin": APP, "Sec-Fetch-Site": "cross-site"}
    status, data, headers = await call("POST", url + CHAT, json=body, headers=cross)
    assert status == 200 and data is not None
    assert data["choices"][0]["message"]["content"] == "echo: hi"
    assert headers["Access-Control-Allow-Origin"] == APP
    assert "x-request-id" in headers["Access-Control-Expose-Headers"]
    assert "Origin" in headers["Vary"]


async def test_listed_origin_can_read_a_stream_and_its_errors(start_gateway: StartGateway) -> None:
    """A listed page reading an SSE stream, or a 404, gets the CORS headers the browser needs."""
    url = await start_gateway({"api": {"corsOrigins": [APP]}})
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(url + CHAT, json=body, headers={"Origin": APP}) as r:
            assert r.status == 200 and b"[DONE]" in await r.read()
            assert r.headers["Access-Control-Allow-Origin"] == APP
            assert r.headers["x-request-id"]
        async with s.get(url + "/v1/nope", headers={"Origin": APP}) as r:
            assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == APP


async def test_preflight_for_listed_origin_needs_no_key(start_gateway: StartGateway) -> None:
    """The openai JS SDK's preflight from a listed origin is answered 204, without the API key."""
    url = await start_gateway({"api": {"corsOrigins": [APP + "/"], "apiKey": "k-0123456789"}})
    wanted = "authorization,content-type,x-stainless-os,x-stainless-retry-count,x-session-id"
    pre = {"Origin": APP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": wanted}
    for path in (CHAT, "/v1/models", f"/v1/models/{MODEL}"):
        status, _, headers = await call("OPTIONS", url + path, headers=pre)
        assert status == 204, path
        assert headers["Access-Control-Allow-Origin"] == APP
        assert headers["Vary"] == "Origin"
        assert set(headers["Access-Control-Allow-Methods"].split(", ")) >= {"GET", "POST", "PATCH", "DELETE"}
        assert headers["Access-Control-Allow-Headers"].split(", ") == wanted.split(",")
        assert int(headers["Access-Control-Max-Age"]) > 0
        assert "x-request-id" in headers["Access-Control-Expose-Headers"]


async def test_preflight_from_other_origins_is_refused(start_gateway: StartGateway) -> None:
    """A preflight from an unlisted origin gets 403 and no CORS headers, so the browser stops there."""
    url = await start_gateway({"api": {"corsOrigins": [APP]}})
    pre = {"Origin": EVIL, "Access-Control-Request-Method": "POST"}
    status, body, headers = await call("OPTIONS", url + CHAT, headers=pre)
    assert status == 403 and body is not None and body["error"]["code"] == "forbidden"
    assert not [h for h in headers if h.lower().startswith("access-control-")]
    pre["Origin"] = APP
    status, body, _ = await call("OPTIONS", url + "/v1/nope", headers=pre)
    assert status == 404 and body is not None and body["error"]["code"] == "not_found"


async def test_openai_sdk_preflight_headers_are_all_allowed(
    start_gateway: StartGateway, aiohttp_server: ServerFactory
) -> None:
    """Every header the official SDK sends may be asked for in a preflight (x-stainless-* included)."""
    url = await start_gateway({"api": {"corsOrigins": [APP]}})
    sent: list[str] = []

    async def models(request: web.Request) -> web.Response:
        sent.extend(k.lower() for k in request.headers)
        return web.json_response({"object": "list", "data": []})

    recorder = web.Application()
    recorder.router.add_get("/v1/models", models)
    server = await aiohttp_server(recorder)
    base = str(server.make_url("/v1"))
    async with openai.AsyncOpenAI(
        base_url=base, api_key="k", max_retries=0, default_headers={"X-Session-Id": "s1"}
    ) as c:
        await c.models.list()
    # What a browser would list: everything beyond the headers it sets itself.
    own = {"host", "accept", "accept-encoding", "connection", "content-length", "user-agent"}
    wanted = ",".join(h for h in sent if h not in own)
    assert "x-stainless-lang" in wanted and "authorization" in wanted
    pre = {"Origin": APP, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": wanted}
    status, _, headers = await call("OPTIONS", url + "/v1/models", headers=pre)
    assert status == 204
    assert set(headers["Access-Control-Allow-Headers"].split(", ")) == set(wanted.split(","))


async def test_foreign_host_is_misdirected(gateway: str, fake_llm: FakeLLM) -> None:
    """DNS rebinding (a Host naming another site) gets 421 before any turn; /health stays a probe."""
    port = urlsplit(gateway).port
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for host in (f"evil.example:{port}", "evil.example", f"localhost:{port + 1 if port else 1}"):
        status, data, _ = await call("POST", gateway + CHAT, json=body, headers={"Host": host})
        assert status == 421, host
        assert data is not None and data["error"]["code"] == "misdirected_request"
        assert "api.allowedHosts" in data["error"]["message"]
    assert fake_llm.requests == []
    status, _, _ = await call("GET", gateway + "/health", headers={"Host": "evil.example"})
    assert status == 200


async def test_loopback_names_with_the_listening_port_are_answered(gateway: str) -> None:
    """localhost, 127.0.0.1 and [::1] with the port the server listens on are all answered."""
    port = urlsplit(gateway).port
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        status, _, _ = await call("GET", gateway + "/v1/models", headers={"Host": host})
        assert status == 200, host


async def test_wildcard_bind_answers_the_address_it_was_reached_on(start_gateway: StartGateway) -> None:
    """Bound to 0.0.0.0, the address a connection arrived on (and localhost on loopback) is answered."""
    url = await start_gateway({"api": {"host": "0.0.0.0", "apiKey": "k-0123456789"}})
    port = urlsplit(url).port
    auth = {"Authorization": "Bearer k-0123456789"}
    for host, want in ((f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), (f"evil.example:{port}", 421)):
        status, _, _ = await call("GET", url + "/v1/models", headers={"Host": host, **auth})
        assert status == want, host


async def test_allowed_hosts_add_names(start_gateway: StartGateway, tmp_path: Path) -> None:
    """api.allowedHosts: a bare name is answered on any port, name:port only on that port, * on all."""
    url = await start_gateway({"api": {"allowedHosts": ["API.example.com", "tunnel.example:8443", "::2"]}})
    for host, want in (
        ("api.example.com", 200),
        ("api.example.com:9000", 200),
        ("tunnel.example:8443", 200),
        ("tunnel.example", 421),
        ("tunnel.example:9000", 421),
        ("[::2]:9000", 200),
    ):
        status, _, _ = await call("GET", url + "/v1/models", headers={"Host": host})
        assert status == want, host
    # a second server needs its own workspace (one server per workspace)
    second = {"api": {"allowedHosts": ["*"]}, "agents": {"defaults": {"workspace": str(tmp_path / "ws2")}}}
    url = await start_gateway(second)
    status, _, _ = await call("GET", url + "/v1/models", headers={"Host": "anything.example"})
    assert status == 200


async def test_request_without_host_is_answered(gateway: str) -> None:
    """An HTTP/1.0 client that sends no Host (no browser does) still gets its answer."""
    split = urlsplit(gateway)
    assert split.hostname is not None and split.port is not None
    reader, writer = await asyncio.open_connection(split.hostname, split.port)
    writer.write(b"GET /v1/models HTTP/1.0\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.0 200") and MODEL.encode() in head


async def test_bearer_scheme_is_case_insensitive(start_gateway: StartGateway) -> None:
    """`bearer KEY` and `BEARER KEY` authenticate (RFC 7235); another scheme or key does not."""
    url = await start_gateway({"api": {"apiKey": "k-0123456789"}})
    for auth, want in (
        ("bearer k-0123456789", 200),
        ("BEARER k-0123456789", 200),
        ("Bearer  k-0123456789", 200),
        ("Basic k-0123456789", 401),
        ("bearer k-012345678", 401),
        ("k-0123456789", 401),
    ):
        status, _, _ = await call("GET", url + "/v1/models", headers={"Authorization": auth})
        assert status == want, auth
