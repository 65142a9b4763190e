"""The HTTP server's connections: how long they may sit idle, the file limit, and shutdown.

- A connection must send a complete request head within ``api.headerTimeout``: one sweep
  over the open connections, a few times per ``headerTimeout`` (at most once a second),
  closes those that have not. Idle keep-alive connections are closed by aiohttp itself
  after ``api.idleTimeout`` (its ``keepalive_timeout``, which also runs from the moment a
  connection opens).
- The same sweep counts open file descriptors every few seconds and warns (at most once a
  minute) when the process nears its ``RLIMIT_NOFILE``: past it, new clients are refused.
- On shutdown (before :func:`run_until` returns), :func:`drain_requests` refuses new
  requests with a 503, gives running ones ``api.shutdownGrace`` seconds, and then answers
  the rest with a 503 (or an SSE error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
from collections.abc import AsyncIterator
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from nanobot.config import ApiConfig
from nanobot.errors import RequestError
from nanobot.gateway.errors import error_response, summarize_parse_error
from nanobot.gateway.ids import new_id
from nanobot.gateway.state import STATE

log = logging.getLogger(__name__)

_FD_CHECK_EVERY = 2.0  # seconds between counts of open file descriptors
_FD_WARN_SHARE = 0.8  # warn above this share of the soft file limit
_FD_WARN_EVERY = 60.0  # at most one warning per this many seconds
# After the grace, requests answered with a 503 get this long to write it before aiohttp cuts them.
_LAST_WRITE = 1.0


class _OpenAIErrors(RequestHandler):
    """A connection whose own protocol errors (a bad request line, an invalid or oversized header:
    answered by aiohttp before any route or middleware runs) get the OpenAI error shape and an
    ``x-request-id``, like every other error. aiohttp still logs them (one line: see
    ``gateway.errors.OneLineBadRequests``) and closes the connection."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)
        if status >= 500:  # the app's own failures never get here: its middleware answers them
            return plain
        what = summarize_parse_error(message) if message else HTTPStatus(status).phrase
        text = f"malformed HTTP request: {what}"
        error = RequestError(text, code="bad_request")
        error.status = status
        resp = error_response(error)
        resp.headers["x-request-id"] = new_id("req_")
        resp.force_close()
        return resp


class _Server(Server):
    def __call__(self) -> RequestHandler:
        return _OpenAIErrors(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> Server:
        # aiohttp has no public seam for the connection class: rebuild the app's server with ours.
        made = await super()._make_server()
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )


def make_runner(app: web.Application, api: ApiConfig) -> web.AppRunner:
    """The app's runner: handlers cancelled when their client leaves, idle connections closed,
    malformed requests answered in OpenAI shape."""
    return _Runner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=min(api.shutdown_grace, _LAST_WRITE),
        keepalive_timeout=api.idle_timeout,
    )


async def run_until(stop: asyncio.Event, runner: web.AppRunner, api: ApiConfig) -> None:
    """Guard the runner's connections until ``stop`` is set, then drain the running requests."""
    async with guard_connections(runner, api):
        await stop.wait()
        await drain_requests(runner.app, api.shutdown_grace)


@contextlib.asynccontextmanager
async def guard_connections(runner: web.AppRunner, api: ApiConfig) -> AsyncIterator[None]:
    """Sweep the runner's connections (head timeout, file limit) for as long as the block runs."""
    server = runner.server
    if server is None:
        raise RuntimeError("guard_connections needs a runner that is set up")
    task = asyncio.create_task(_sweep(server, api.header_timeout), name="nanobot-connections")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


async def _sweep(server: Server, header_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    period = max(0.01, min(1.0, header_timeout / 4))
    limit = _file_limit()
    first_seen: dict[RequestHandler, float] = {}  # connections that have sent no request head yet
    next_fd_check = 0.0
    warned_at = float("-inf")
    while True:
        await asyncio.sleep(period)
        now = loop.time()
        waiting: dict[RequestHandler, float] = {}
        conns = server.connections
        for conn in conns:
            # aiohttp counts the request heads it has parsed on each connection; no public
            # accessor exists (tests/test_bounds.py fails if this ever stops working).
            if conn._request_count:
                continue
            since = first_seen.get(conn, now)
            if now - since >= header_timeout:
                conn.force_close()
            else:
                waiting[conn] = since
        first_seen = waiting
        if limit and now >= next_fd_check:
            next_fd_check = now + _FD_CHECK_EVERY
            used = _open_fds(limit)
            if used is not None and used > limit * _FD_WARN_SHARE and now - warned_at >= _FD_WARN_EVERY:
                warned_at = now
                log.warning(
                    "nearing the open-file limit: %d of %d file descriptors in use (%d HTTP connections); "
                    "past it new clients are refused: raise the limit (ulimit -n) or lower "
                    "api.idleTimeout",
                    used,
                    limit,
                    len(conns),
                )


def _file_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 0 if soft == resource.RLIM_INFINITY else soft


def _open_fds(limit: int) -> int | None:
    """Open file descriptors (a few hundred microseconds, every few seconds); None if unknown."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path))
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return limit  # not even one left to count them with
    return None


async def drain_requests(app: web.Application, grace: float) -> None:
    """Refuse new requests (503), let running ones finish within ``grace``, end the rest with a 503."""
    state = app[STATE]
    state.readiness.stop()  # /health/ready: 503 from now on, so a load balancer stops sending
    api = state.api
    if api.admitted:
        log.info("shutting down: waiting up to %g s for %d running requests", grace, api.admitted)
    else:
        log.info("shutting down")
    left = await api.drain(grace)
    if left:
        log.warning("shutting down: %d requests still running after %g s were answered 503", left, grace)
