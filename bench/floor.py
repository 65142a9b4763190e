"""The floor: the smallest correct aiohttp proxy, ``python -m bench.floor --upstream URL``.

It receives ``POST /v1/chat/completions``, forwards the body unchanged on one pooled
``ClientSession`` to the same upstream the gateway uses, and returns the upstream's status
and body. That is what any aiohttp server + client pair costs per request; the gateway's own
work is what it adds on top (``gateway ÷ floor`` is the headline ratio of ``python -m bench``).
It runs like the gateway: uvloop when importable, no access log, one process, and the same
aiohttp web ``Application`` + router the gateway is built on. Prints ``READY <port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from bench.upstream import _listen, run_loop

SESSION = web.AppKey("session", aiohttp.ClientSession)
TARGET = web.AppKey("target", str)


async def forward(request: web.Request) -> web.Response:
    """Forward the body, return the upstream's status, content type and body."""
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(
        request.app[TARGET], data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        data = await resp.read()
        return web.Response(status=resp.status, body=data, content_type=resp.content_type)


async def health(_request: web.Request) -> web.Response:
    """Liveness, like the gateway's."""
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def make_app(upstream: str) -> web.Application:
    """The proxy app: one pooled client session for its lifetime (no cookie jar, as the gateway)."""
    app = web.Application()
    app[TARGET] = upstream.rstrip("/") + "/chat/completions"

    async def client(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as s:
            app[SESSION] = s
            yield

    app.cleanup_ctx.append(client)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/health", health)
    return app


async def serve(upstream: str, port: int) -> None:
    """Serve until killed; print ``READY <port>`` once listening."""
    runner = web.AppRunner(make_app(upstream), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    sock = _listen(port)
    await web.SockSite(runner, sock, backlog=4096).start()
    sys.stdout.write(f"READY {sock.getsockname()[1]}\n")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--upstream", required=True, help="the upstream's API base, e.g. http://127.0.0.1:N/v1"
    )
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(serve(args.upstream, args.port))


if __name__ == "__main__":
    main()
