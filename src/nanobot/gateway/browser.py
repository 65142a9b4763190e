"""Browser safety: the ``Host`` a request may name, the ``Origin`` it may come from, and CORS.

A web page the user visits must not be able to drive the agent. Three rules, checked in the
one gateway middleware before anything else runs:

- ``Host`` must be one this server answers for (DNS rebinding sends the attacker's name):
  the bound address, the address the connection arrived on, or ``localhost``/``127.0.0.1``/
  ``[::1]`` on loopback, with the port it arrived on; or an ``api.allowedHosts`` entry (``name`` on any port,
  ``name:port`` exactly, ``*`` for any Host). A request without ``Host`` (HTTP/1.0) passes:
  browsers always send one, so it cannot come from a page.
- An ``Origin`` must be listed in ``api.corsOrigins`` or be the server's own (same-origin:
  the ``Host`` it was sent to, over http or https). Without ``Origin`` (curl, SDKs) a request
  passes unless it says ``Sec-Fetch-Site: cross-site`` (a page's no-cors request).
- Listed origins get CORS: preflights answered, responses readable.

Everything that can be is computed once from the config; a request costs a few header
lookups and set membership tests.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from aiohttp import web

from nanobot.config import ApiConfig, is_loopback_host
from nanobot.errors import ForbiddenError, MisdirectedError

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "[::]"})  # as _host_name writes them
ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
# What the official openai SDKs and our own clients send; x-stainless-* are matched by prefix.
_ALLOWED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "authorization",
        "content-type",
        "idempotency-key",
        "openai-beta",
        "openai-organization",
        "openai-project",
        "user-agent",
        "x-request-id",
        "x-session-id",
    }
)
# The SDKs read these to retry well and to report the request id.
EXPOSE_HEADERS = "x-request-id, x-should-retry, retry-after"
MAX_AGE = "600"
_SHOWN = 200  # characters of a client's header value quoted back in an error


def _host_name(host: str) -> str:
    """A bind address as it appears in a ``Host`` header: lower case, IPv6 in brackets."""
    host = host.strip().lower()
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def split_host(host: str) -> tuple[str, str]:
    """``name`` and ``port`` (``""`` when absent) of a lower-cased ``Host`` value."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, ""
        name, rest = host[: end + 1], host[end + 1 :]
        return name, rest[1:] if rest.startswith(":") else rest
    name, sep, port = host.rpartition(":")
    return (name, port) if sep else (host, "")


@dataclass(frozen=True, slots=True)
class BrowserPolicy:
    """The allowed ``Host`` values and origins, computed once from ``api`` config."""

    exact_hosts: frozenset[str]  # accepted as sent: bind names with the configured port, name:port entries
    bind_names: frozenset[str]  # names of the bound address: need the port the connection arrived on
    any_port_hosts: frozenset[str]  # allowedHosts entries without a port
    any_host: bool  # allowedHosts contains "*"
    cors_origins: frozenset[str]
    any_host_paths: frozenset[str] = frozenset()  # webhook routes: authenticated by their own secret

    @classmethod
    def from_config(cls, api: ApiConfig, webhook_routes: frozenset[str] = frozenset()) -> BrowserPolicy:
        """The policy for ``api.host``, ``api.port``, ``api.allowedHosts`` and ``api.corsOrigins``,
        with any Host accepted on ``webhook_routes``."""
        bound = _host_name(api.host)
        # Bound to every address, the name is the address a connection arrived on: see _is_local.
        wildcard = bound in _WILDCARD_BINDS
        names: set[str] = set() if wildcard else {bound}
        if not wildcard and is_loopback_host(bound):
            names |= _LOOPBACK_NAMES
        exact = {f"{n}:{api.port}" for n in names} | (set(names) if api.port == 80 else set())
        any_port: set[str] = set()
        for entry in (_host_name(e) for e in api.allowed_hosts):  # a bare IPv6 address gets brackets
            name, port = split_host(entry)
            if port:
                exact.add(f"{_host_name(name)}:{port}")
            elif entry:
                any_port.add(entry)
        origins = frozenset(o.strip().lower().rstrip("/") for o in api.cors_origins)
        return cls(
            exact_hosts=frozenset(exact),
            bind_names=frozenset(names),
            any_port_hosts=frozenset(any_port - {"*"}),
            any_host="*" in any_port,
            cors_origins=origins - {"null", ""},  # an opaque origin is any sandboxed page
            any_host_paths=webhook_routes,
        )

    def check_host(self, host: str | None, request: web.Request) -> None:
        """Raise :class:`MisdirectedError` unless ``host`` is one this server answers for."""
        if host is None or self.any_host or host in self.exact_hosts:  # the usual case, at once
            return
        lowered = host.lower()
        name, port = split_host(lowered)
        if name in self.any_port_hosts or self._is_local(name, port or "80", request):
            return
        if request.path in self.any_host_paths:  # (checked last: no cost to the usual request)
            return
        raise MisdirectedError(
            f"This server does not answer for Host {host[:_SHOWN]!r}; if it should, "
            "add the name to api.allowedHosts."
        )

    def _is_local(self, name: str, port: str, request: web.Request) -> bool:
        """Whether ``name:port`` names where this connection arrived: a bind name, the local
        address itself, or a loopback name on a loopback connection, each with the port it
        arrived on (which differs from ``api.port`` for port 0 or a test server). An address
        literal or a loopback name cannot be a rebinding page's Host: that carries its domain."""
        transport = request.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        if not isinstance(local, tuple) or port != str(local[1]):
            return False
        if name in self.bind_names:
            return True
        address = _host_name(str(local[0]))
        return name == address or (name in _LOOPBACK_NAMES and is_loopback_host(address))

    def check_origin(self, origin: str, host: str | None) -> bool:
        """Raise :class:`ForbiddenError` unless ``origin`` may call; True when it is a listed
        cross-origin one (its responses need CORS headers)."""
        lowered = origin.lower()
        if lowered in self.cors_origins:
            return True
        if host is not None:
            scheme, sep, rest = lowered.partition("://")
            if sep and scheme in ("http", "https") and rest == host.lower():
                return False
        shown = "a page with an opaque origin (Origin: null)" if lowered == "null" else origin[:_SHOWN]
        raise ForbiddenError(
            f"Requests from web pages at {shown} are not allowed; "
            "to allow that origin, add it to api.corsOrigins."
        )

    @staticmethod
    def refuse_cross_site() -> ForbiddenError:
        """The error for a browser request marked ``Sec-Fetch-Site: cross-site`` without ``Origin``."""
        return ForbiddenError(
            "Cross-site requests from web pages are not allowed; "
            "to allow a page's origin, add it to api.corsOrigins."
        )


def preflight(origin: str, requested: str | None) -> web.Response:
    """The 204 answer to an allowed origin's CORS preflight."""
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Max-Age": MAX_AGE,
        "Access-Control-Expose-Headers": EXPOSE_HEADERS,
        "Vary": "Origin",
    }
    if requested:
        wanted = (h.strip().lower() for h in requested.split(","))
        allowed = [h for h in wanted if h in _ALLOWED_REQUEST_HEADERS or h.startswith("x-stainless-")]
        if allowed:  # a header left out makes the browser refuse the request, as it should
            headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
    return web.Response(status=204, headers=headers)


CORS_ORIGIN = web.RequestKey("nanobot.cors_origin", str)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: let a listed origin's page read the response (streams too)."""
    origin = request.get(CORS_ORIGIN)
    if origin is None:
        return
    headers = response.headers
    headers["Access-Control-Allow-Origin"] = origin
    headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    vary = headers.get("Vary")
    headers["Vary"] = f"{vary}, Origin" if vary and "origin" not in vary.lower() else vary or "Origin"
