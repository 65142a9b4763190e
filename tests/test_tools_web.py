"""web_fetch: pages as text, bounded, and never onto loopback, private or metadata addresses."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from nanobot.bus import MessageBus
from nanobot.tools import ToolContext
from nanobot.tools.web import WebFetchTool
from nanobot.tools_config import WebToolConfig
from tool_calls import call_on, call_tool

from fake_llm import FakeLLM

PAGE = """<!doctype html><html><head><title>The  Title</title>
<style>body { color: red }</style><script>var secret = "do not show";</script></head>
<body><h1>Main heading</h1><p>First paragraph
 spans lines.</p><ul><li>one</li><li>two</li></ul><p>Last &amp; final.</p></body></html>"""

PRIVATE = {"tools": {"web": {"allowPrivate": True}}}


class Site:
    """A loopback web site that counts the requests it gets."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.redirect_to = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{name}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits.append(name)
        if name == "page":
            return web.Response(text=PAGE, content_type="text/html")
        if name == "long":
            return web.Response(text="<p>" + "word " * 5000 + "</p>", content_type="text/html")
        if name == "plain":
            return web.Response(text="just text\n  kept as is", content_type="text/plain")
        if name == "png":
            return web.Response(body=b"\x89PNG\r\n\x1a\n" + bytes(200), content_type="image/png")
        if name == "redirect":
            raise web.HTTPFound(self.redirect_to)
        if name == "loop":
            raise web.HTTPFound("/loop")
        raise web.HTTPNotFound()


@pytest.fixture
async def site(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[Site, str]:
    """The site and its base URL (http://127.0.0.1:PORT)."""
    s = Site()
    server = await aiohttp_server(s.app())
    return s, str(server.make_url("")).rstrip("/")


Gateway = Callable[..., Awaitable[str]]


async def fetch(
    start: Gateway, llm: FakeLLM, url: str, config: dict[str, Any] | None = None, **more: Any
) -> str:
    return await call_tool(start, llm, "web_fetch", {"url": url, **more}, config)


async def test_html_page_becomes_readable_text(
    start_gateway: Gateway, fake_llm: FakeLLM, site: tuple[Site, str]
) -> None:
    """The model gets the page's title, headings, paragraphs and list items; no script or style."""
    _, base = site
    text = await fetch(start_gateway, fake_llm, f"{base}/page", PRIVATE)
    assert "Title: The Title" in text and "Status: 200" in text
    assert "# Main heading\n\nFirst paragraph spans lines." in text
    assert "- one\n- two" in text and "Last & final." in text
    assert "secret" not in text and "color" not in text


async def test_long_page_is_cut_at_max_chars(
    start_gateway: Gateway, fake_llm: FakeLLM, site: tuple[Site, str]
) -> None:
    """maxChars bounds what the model reads, and says the text was cut."""
    _, base = site
    text = await fetch(start_gateway, fake_llm, f"{base}/long", PRIVATE, maxChars=300)
    body = text.split("\n\n", 1)[1]
    assert (
        body.startswith("word word")
        and "[truncated: 24,999 characters in all; fetched 300 (maxChars)]" in body
    )
    assert len(body) < 400


async def test_plain_text_is_returned_as_is(
    start_gateway: Gateway, fake_llm: FakeLLM, site: tuple[Site, str]
) -> None:
    """A text/plain page is not treated as HTML."""
    _, base = site
    text = await fetch(start_gateway, fake_llm, f"{base}/plain", PRIVATE)
    assert text.endswith("\n\njust text\n  kept as is")


async def test_binary_content_is_refused(
    start_gateway: Gateway, fake_llm: FakeLLM, site: tuple[Site, str]
) -> None:
    """An image is not dumped into the model's context: the tool says it reads text only."""
    _, base = site
    text = await fetch(start_gateway, fake_llm, f"{base}/png", PRIVATE)
    assert text.startswith("Error: ") and "is not a text page (image/png)" in text


async def test_loopback_is_refused_without_a_connection(
    start_gateway: Gateway, fake_llm: FakeLLM, site: tuple[Site, str]
) -> None:
    """By default a loopback URL is refused before anything is sent to it."""
    s, base = site
    text = await fetch(start_gateway, fake_llm, f"{base}/page")
    assert text == "Error: refused: 127.0.0.1 is a loopback address (tools.web.allowPrivate)"
    assert s.hits == []


async def test_a_name_is_checked_after_dns(
    start_gateway: Gateway, fake_llm: FakeLLM, site: tuple[Site, str]
) -> None:
    """A host name that resolves to loopback is refused too (the check is on the resolved address)."""
    s, base = site
    port = base.rsplit(":", 1)[1]
    text = await fetch(start_gateway, fake_llm, f"http://localhost:{port}/page")
    assert "refused: localhost resolves to " in text and "which is a loopback address" in text
    assert s.hits == []


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://10.0.0.1/", "10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
        ("http://[fd00:ec2::254]/", "fd00:ec2::254 is a cloud metadata address"),
        ("http://100.64.1.1/", "100.64.1.1 is a shared (CGNAT) address"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1 is a loopback address"),
        ("http://0.0.0.0/", "0.0.0.0 is an unspecified address"),
        ("http://[::1]/", "::1 is a loopback address"),
        ("http://224.0.0.1/", "224.0.0.1 is a multicast address"),
        ("http://0x7f.1/", "0x7f.1 resolves to 127.0.0.1, which is a loopback address"),
        ("http://127.0.0.1:80@10.0.0.1/", "10.0.0.1 is a private address"),
        # IPv6 forms that carry an IPv4 address: IPv4-compatible, NAT64, 6to4
        ("http://[::127.0.0.1]/", "::7f00:1 is a loopback address"),
        ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::a9fe:a9fe is a cloud metadata address"),
        ("http://[2002:a00:1::]/", "2002:a00:1:: is a private address"),
    ],
)
async def test_private_and_metadata_addresses_are_refused(
    start_gateway: Gateway, fake_llm: FakeLLM, url: str, why: str
) -> None:
    """Private, metadata, CGNAT and unspecified addresses are refused before connecting."""
    text = await fetch(start_gateway, fake_llm, url)
    assert text == f"Error: refused: {why} (tools.web.allowPrivate)"


async def test_only_http_and_https(start_gateway: Gateway, fake_llm: FakeLLM) -> None:
    """file:// and other schemes are refused."""
    text = await fetch(start_gateway, fake_llm, "file:///etc/passwd", PRIVATE)
    assert text == "Error: only http and https URLs can be fetched, not 'file'"


async def test_redirect_to_loopback_is_refused(
    start_gateway: Gateway,
    fake_llm: FakeLLM,
    site: tuple[Site, str],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    """A page the operator allowed cannot redirect the fetch onto another local address."""
    s, base = site
    inner = Site()
    inner_url = str((await aiohttp_server(inner.app())).make_url("/page"))
    allowed = {"tools": {"web": {"allowedHosts": [base.removeprefix("http://")]}}}
    url = await start_gateway(allowed)

    s.redirect_to = "/page"  # within the allowed host: followed
    assert "Title: The Title" in await call_on(url, fake_llm, "web_fetch", {"url": f"{base}/redirect"})
    s.redirect_to = inner_url  # another port on loopback: refused before connecting
    text = await call_on(url, fake_llm, "web_fetch", {"url": f"{base}/redirect"})
    assert text == "Error: refused: 127.0.0.1 is a loopback address (tools.web.allowPrivate)"
    s.redirect_to = inner_url.replace("127.0.0.1", "localhost")  # by name: refused after DNS
    text = await call_on(url, fake_llm, "web_fetch", {"url": f"{base}/redirect"})
    assert "refused: localhost resolves to" in text
    assert inner.hits == []
    assert s.hits == ["redirect", "page", "redirect", "redirect"]


async def test_redirects_are_bounded(
    start_gateway: Gateway, fake_llm: FakeLLM, site: tuple[Site, str]
) -> None:
    """A redirect loop ends after five hops with an error for the model."""
    s, base = site
    text = await fetch(start_gateway, fake_llm, f"{base}/loop", PRIVATE)
    assert text.startswith("Error: too many redirects (more than 5)")
    assert s.hits == ["loop"] * 6


class FixedDNS(AbstractResolver):
    """A DNS that answers every name with one address (the resolver seam, like an httpx transport)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            {"hostname": host, "host": self.address, "port": port, "family": family, "proto": 0, "flags": 0}
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("address", "why"), [("10.1.2.3", "a private address"), ("169.254.169.254", "a cloud metadata address")]
)
async def test_a_name_pointing_inward_is_refused(address: str, why: str) -> None:
    """A public-looking name whose DNS answer is private is refused: the resolved address is what counts."""
    dns = FixedDNS(address)
    tool = WebFetchTool(WebToolConfig(timeout=5), resolver=dns)
    result = await tool.execute(
        {"url": "http://intranet.example.com/"}, ToolContext(MessageBus(), "api", "c", "r")
    )
    assert not isinstance(result, str)
    assert result.is_error
    expected = f"intranet.example.com resolves to {address}, which is {why} (tools.web.allowPrivate)"
    assert result.text == f"Error: refused: {expected}"
    assert dns.asked == ["intranet.example.com"]
