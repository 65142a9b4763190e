"""``web_fetch``: GET one http(s) page as readable text, bounded, and never onto the private network.

The server usually sits next to things the internet must not reach through it (a router's
admin page, a cloud metadata service, other local servers). So every address is checked
*after* DNS resolution, on every redirect hop, and the connection goes to exactly the address
that was checked: the check runs inside the resolver aiohttp connects with (no second lookup
an attacker's DNS could answer differently). IP literals never reach a resolver: they are
checked before the request. ``tools.web.allowPrivate`` turns the check off;
``tools.web.allowedHosts`` lets named hosts (or ``host:port``) through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from nanobot.tools.base import Tool, ToolContext, ToolResult
from nanobot.tools.html_text import html_to_text
from nanobot.tools_config import WebToolConfig

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_TEXT_TYPES = frozenset(
    {"application/json", "application/xml", "application/javascript", "application/xhtml+xml"}
)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_HEADERS = {
    "User-Agent": "nanobot-web-fetch/1.0",
    "Accept": "text/html,text/plain,application/json;q=0.9,*/*;q=0.5",
}

_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "description": "The http:// or https:// URL to fetch."},
        "maxChars": {
            "type": "integer",
            "minimum": 100,
            "description": "At most this many characters of text.",
        },
    },
    "required": ["url"],
}


class RefusedAddress(OSError):
    """The host resolves to an address web_fetch may not reach."""


def refusal(address: str) -> str | None:
    """Why ``address`` (an IP) may not be fetched from ("a loopback address"), or None when it is public."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:  # judged by the IPv4 address it carries (or reaches, through a gateway)
            ip = embedded
    why = (
        "a cloud metadata address" if ip in _METADATA
        else "a loopback address" if ip.is_loopback
        else "a link-local address" if ip.is_link_local
        else "a multicast address" if ip.is_multicast
        else "an unspecified address" if ip.is_unspecified
        else "a shared (CGNAT) address" if ip in _CGNAT
        else "a private address" if ip.is_private
        else "not a public address" if not ip.is_global
        else None
    )  # fmt: skip
    return why


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for: mapped (``::ffff:a.b.c.d``), the deprecated
    IPv4-compatible form (``::a.b.c.d``), NAT64 (``64:ff9b::a.b.c.d``), 6to4 and Teredo."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # (::1 and :: are themselves)
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class AddressGuard:
    """Which hosts and addresses web_fetch may reach."""

    def __init__(self, config: WebToolConfig) -> None:
        self.allow_private = config.allow_private
        self._hosts: set[tuple[str, int | None]] = set()
        for entry in config.allowed_hosts:
            parts = urlsplit(f"//{entry.strip()}")
            if parts.hostname:
                self._hosts.add((parts.hostname.lower(), parts.port))

    def trusted(self, host: str, port: int) -> bool:
        """The host is reachable whatever it resolves to (allowPrivate, or allowedHosts)."""
        host = host.lower().strip("[]")
        return self.allow_private or (host, None) in self._hosts or (host, port) in self._hosts

    def check(self, host: str, port: int, address: str) -> None:
        """Raise :class:`RefusedAddress` unless ``address`` (what ``host`` resolved to) may be reached."""
        if self.trusted(host, port):
            return
        why = refusal(address)
        if why is not None:
            shown = address if host == address else f"{host} resolves to {address}, which"
            raise RefusedAddress(f"refused: {shown} is {why} (tools.web.allowPrivate)")


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` (the system resolver by default), then refuses the whole host if any
    address it resolved to is refused: a name that also points inward is not fetched at all."""

    def __init__(self, guard: AddressGuard, inner: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The host's addresses, once each of them has passed the guard."""
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self._guard.check(host, port, result["host"])
        return results

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()


class WebFetchTool(Tool):
    """``web_fetch``: a page as text. ``resolver`` is the DNS seam (tests, or a custom DNS)."""

    name = "web_fetch"
    description = (
        "Fetch a web page (http or https, GET) and return its readable text: title, headings, "
        "paragraphs and lists. Only public addresses are reachable. Use maxChars to read less."
    )
    parameters = _PARAMETERS

    def __init__(self, config: WebToolConfig, resolver: AbstractResolver | None = None) -> None:
        self._config = config
        self._guard = AddressGuard(config)
        self._resolver = resolver

    def summarize(self, args: dict[str, Any]) -> str:
        """The URL fetched."""
        return str(args.get("url", ""))

    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult | str:
        """Fetch ``args["url"]`` (following up to five redirects, each checked) and return its text."""
        url = args.get("url")
        if not isinstance(url, str) or not url.strip():
            return _error("url must be a non-empty string")
        limit = args.get("maxChars")
        max_chars = self._config.max_chars
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            max_chars = max(100, limit)
        # A fresh connector per call: each one resolves through the guard, and nothing lingers.
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self._guard, self._resolver), use_dns_cache=False, limit=1
        )
        timeout = aiohttp.ClientTimeout(total=None, connect=self._config.timeout)
        try:
            async with (
                asyncio.timeout(self._config.timeout),
                aiohttp.ClientSession(
                    connector=connector,
                    timeout=timeout,
                    cookie_jar=aiohttp.DummyCookieJar(),
                    headers=_HEADERS,
                ) as session,
            ):
                return await self._fetch(session, url.strip(), max_chars)
        except TimeoutError:
            return _error(f"{url} did not answer within {self._config.timeout:g} s (tools.web.timeout)")
        except RefusedAddress as exc:
            return _error(str(exc))
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, RefusedAddress):
                return _error(str(exc.os_error))
            return _error(f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}")
        except aiohttp.ClientError as exc:
            return _error(f"fetching {url} failed: {type(exc).__name__}: {exc}")

    def _target(self, url: URL) -> str | None:
        """Why ``url`` may not be fetched (scheme, host, an IP literal that is refused), or None."""
        if url.scheme not in ("http", "https"):
            return f"only http and https URLs can be fetched, not {url.scheme or 'a relative URL'!r}"
        host = url.host
        if not host:
            return "the URL has no host"
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return None  # a name: checked by the resolver once resolved
        try:
            self._guard.check(host.strip("[]"), url.port or 0, host.strip("[]"))
        except RefusedAddress as exc:
            return str(exc)
        return None

    async def _fetch(self, session: aiohttp.ClientSession, url_text: str, max_chars: int) -> ToolResult:
        try:
            url = URL(url_text)
        except ValueError:
            return _error(f"not a valid URL: {url_text!r}")
        for _hop in range(MAX_REDIRECTS + 1):
            why = self._target(url)
            if why is not None:
                return _error(why)
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in _REDIRECTS and "Location" in resp.headers:
                    try:
                        url = resp.url.join(URL(resp.headers["Location"]))
                    except ValueError:
                        return _error(f"{url} redirects to an invalid URL")
                    continue
                return await self._page(resp, max_chars)
        return _error(f"too many redirects (more than {MAX_REDIRECTS}), last to {url}")

    async def _page(self, resp: aiohttp.ClientResponse, max_chars: int) -> ToolResult:
        body, complete = await _read_bounded(resp, self._config.max_bytes)
        ctype = resp.content_type or ""
        if not _is_text(ctype, body):
            return _error(
                f"{resp.url} is not a text page ({ctype or 'unknown type'}); web_fetch reads text only"
            )
        raw = body.decode(_charset(resp, body), errors="replace")
        title = ""
        text = raw
        if ctype in ("text/html", "application/xhtml+xml") or (not ctype and "<html" in raw[:1000].lower()):
            title, text = await asyncio.to_thread(html_to_text, raw)  # megabytes of HTML: CPU work
        head = [f"URL: {resp.url}", f"Status: {resp.status}"]
        if title:
            head.append(f"Title: {title}")
        if not complete:
            head.append(f"(only the first {self._config.max_bytes:,} bytes were read: tools.web.maxBytes)")
        if len(text) > max_chars:
            text = text[:max_chars] + (
                f"\n\n[truncated: {len(text):,} characters in all; fetched {max_chars:,} (maxChars)]"
            )
        return ToolResult("\n".join(head) + "\n\n" + text, is_error=resp.status >= 400)


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the (decompressed) body, and whether that was all of it."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], False
    return b"".join(chunks), True


def _is_text(ctype: str, body: bytes) -> bool:
    if ctype.startswith("text/") or ctype in _TEXT_TYPES or ctype.endswith(("+json", "+xml")):
        return True
    # No type, or a generic one: text when it has no NUL byte at its start.
    return ctype in ("", "application/octet-stream") and b"\x00" not in body[:8192] and bool(body)


def _charset(resp: aiohttp.ClientResponse, body: bytes) -> str:
    charset = resp.charset
    if not charset:
        found = _META_CHARSET.search(body[:4096])
        charset = found.group(1).decode("ascii") if found else "utf-8"
    try:
        "".encode(charset)
    except LookupError:
        return "utf-8"
    return charset


def _error(text: str) -> ToolResult:
    return ToolResult(f"Error: {text}", is_error=True)
