"""The built-in web chat: ``GET /`` and its assets under ``/static/``, served from package data.

The page is plain HTML, CSS and ES modules (no build step, nothing fetched from elsewhere); it
talks to the same ``/v1/*`` API as any client, same-origin, so the browser rules already allow it.
Everything is read once when the app is built and answered from memory: these routes are
separate from the API's and add no work to its requests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from nanobot.errors import NotFoundError

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The page runs only its own files: no inline script or style, no other origin, never framed.
# Model output is rendered with DOM text nodes; this is the second line of defence.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The file names carry no version: the browser keeps a copy but asks (If-None-Match) before
    # using it, so an upgraded nanobot is never served with yesterday's script.
    "Cache-Control": "no-cache",
}
_PAGE_HEADERS = {
    **_COMMON_HEADERS,
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file of the page, held in memory with its validator."""

    body: bytes
    content_type: str
    etag: str
    headers: dict[str, str]

    def respond(self, request: web.Request) -> web.Response:
        """The file, or 304 when the browser's copy is current."""
        if self.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={**self.headers, "ETag": self.etag})
        return web.Response(
            body=self.body,
            content_type=None,
            headers={**self.headers, "ETag": self.etag, "Content-Type": self.content_type},
        )


def load_static() -> dict[str, StaticFile]:
    """Every file of ``nanobot/gateway/static`` by name (read at start-up, not per request)."""
    folder = resources.files("nanobot.gateway").joinpath("static")
    files: dict[str, StaticFile] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if not entry.is_file() or suffix not in _CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        headers = _PAGE_HEADERS if entry.name == "index.html" else _COMMON_HEADERS
        files[entry.name] = StaticFile(body, _CONTENT_TYPES[suffix], etag, headers)
    return files


def add_web_chat(app: web.Application) -> None:
    """Route ``GET /`` to the page and ``GET /static/{name}`` to its assets."""
    files = load_static()
    page = files["index.html"]

    async def index(request: web.Request) -> web.Response:
        """``GET /``: the chat page."""
        return page.respond(request)

    async def asset(request: web.Request) -> web.Response:
        """``GET /static/{name}``: one of the page's files."""
        found = files.get(request.match_info["name"])
        if found is None:
            raise NotFoundError(f"Unknown request URL: {request.method} {request.path}")
        return found.respond(request)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", asset)
