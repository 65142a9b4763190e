"""The web chat's routes: the page and its assets, their headers, and ``api.webChat`` off."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from importlib import resources

import aiohttp
from multidict import CIMultiDict

StartGateway = Callable[..., Awaitable[str]]
STATIC = resources.files("nanobot.gateway").joinpath("static")


async def get(url: str, **kwargs: object) -> tuple[int, CIMultiDict[str], bytes]:
    """Status, headers and body of one GET."""
    async with aiohttp.ClientSession() as s, s.get(url, **kwargs) as r:  # type: ignore[arg-type]
        return r.status, r.headers.copy(), await r.read()


async def test_page_is_served_with_a_strict_content_security_policy(start_gateway: StartGateway) -> None:
    """GET / is the chat page; the browser runs only its own files and never frames it."""
    base = await start_gateway()
    status, headers, body = await get(base + "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="/static/app.js">' in body
    csp = headers["Content-Security-Policy"]
    for directive in (
        "default-src 'self'",
        "script-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data: blob:",
        "frame-ancestors 'none'",
    ):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert "x-request-id" in {k.lower() for k in headers}


async def test_assets_have_their_types_and_are_revalidated(start_gateway: StartGateway) -> None:
    """Scripts and styles come with their real types; an unchanged file is a 304, not a download."""
    base = await start_gateway()
    for name, ctype in (
        ("app.js", "text/javascript; charset=utf-8"),
        ("markdown.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ):
        status, headers, body = await get(f"{base}/static/{name}")
        assert status == 200, name
        assert headers["Content-Type"] == ctype
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-cache"
        assert body == STATIC.joinpath(name).read_bytes()
        again, _, rest = await get(f"{base}/static/{name}", headers={"If-None-Match": headers["ETag"]})
        assert (again, rest) == (304, b"")


async def test_unknown_assets_are_openai_404s(start_gateway: StartGateway) -> None:
    """A missing file, or a path that tries to leave the folder, is a 404 in OpenAI error shape."""
    base = await start_gateway()
    for path in ("/static/nope.js", "/static/..%2Fapp.py", "/static/../webchat.py"):
        status, headers, body = await get(base + path)
        assert status == 404, path
        assert headers["Content-Type"].startswith("application/json")
        assert b'"error"' in body


async def test_the_page_loads_without_the_api_key(start_gateway: StartGateway) -> None:
    """With api.apiKey set the page itself still loads (it asks for the key); /v1 still needs it."""
    base = await start_gateway({"api": {"apiKey": "sk-page-key-123"}})
    assert (await get(base + "/"))[0] == 200
    assert (await get(base + "/static/app.js"))[0] == 200
    assert (await get(base + "/v1/models"))[0] == 401


async def test_web_chat_can_be_turned_off(start_gateway: StartGateway) -> None:
    """api.webChat false: no page and no assets (404), the API as before."""
    base = await start_gateway({"api": {"webChat": False}})
    for path in ("/", "/static/app.js"):
        status, _, body = await get(base + path)
        assert status == 404
        assert b"Unknown request URL" in body
    assert (await get(base + "/v1/models"))[0] == 200


async def test_a_cross_site_page_cannot_fetch_the_page_as_another_origin(start_gateway: StartGateway) -> None:
    """The page obeys the browser rules: a foreign Host (DNS rebinding) does not get it."""
    base = await start_gateway()
    status, _, _ = await get(base + "/", headers={"Host": "evil.example"})
    assert status in (403, 421)


def test_page_is_small_and_self_contained() -> None:
    """Well under 200 KB, no CDN or other origin, and no API that turns text into live HTML."""
    files = [f for f in STATIC.iterdir() if f.is_file()]
    assert sum(len(f.read_bytes()) for f in files) < 200_000
    for f in files:
        text = f.read_text("utf-8")
        if f.name.endswith((".html", ".css")):
            assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", text), f.name
        if f.name.endswith(".js"):
            assert not re.search(r"\b(import|from)\s*\(?\s*[\"']https?:", text), f.name
            for sink in (
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "Function(",
            ):
                assert sink not in text, f"{f.name} uses {sink}"
