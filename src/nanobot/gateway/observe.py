"""Watching the HTTP server: per-request metrics and the access log, ``GET /metrics`` and
``GET /health/ready``.

Requests are counted, timed and logged by one aiohttp access logger rather than in the
middleware: once an access logger is installed aiohttp measures each request anyway (from
its head to the last byte written), it sees the answers aiohttp gives itself (malformed
requests), and only there are the bytes sent known. Per request it costs one dict lookup on
the matched route, a bisect and three additions (about 1 µs with aiohttp's two clock reads);
the log line, when ``api.accessLog`` is on, costs a formatted record and a write (about 20 µs),
which is why it is opt-in.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_urldispatcher import AbstractRoute, UrlMappingMatchInfo

from nanobot.gateway.state import STATE
from nanobot.gateway.worker_metrics import SIBLINGS
from nanobot.metrics import CONTENT_TYPE, Metrics, RouteSeries

ACCESS_LOG = logging.getLogger("nanobot.access")
_MAX_PATH = 256  # characters of a raw path written to the access log


class _Observer(AbstractAccessLogger):
    """Records every answered request in :attr:`metrics`; writes its access-log line when asked.

    aiohttp makes one per connection (with the logger it was given), and calls :meth:`log`
    after each response is written, with the seconds since the request's head arrived.
    """

    __slots__ = ("_lines",)

    metrics: ClassVar[Metrics]
    routes: ClassVar[dict[AbstractRoute, RouteSeries]]  # matched route -> its series
    access_log: ClassVar[bool]

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._lines = self.access_log and logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Count (and log) one answered request."""
        # The router's match, kept on the request (no public accessor that tolerates its absence);
        # None when aiohttp answered before routing. tests/test_metrics.py fails if it moves.
        info: UrlMappingMatchInfo | None = getattr(request, "_match_info", None)
        if info is None:
            series = self.metrics.other
        else:
            series = self.routes.get(info.route) or self._series(info.route)
        series.record(response.status, time)
        if self._lines:
            self._line(request, response, series, time)

    def _series(self, route: AbstractRoute) -> RouteSeries:
        resource = route.resource
        if resource is None:  # no route matched (404, 405): aiohttp makes a new route object each time
            return self.metrics.other
        series = self.routes[route] = self.metrics.route(route.method, resource.canonical)
        return series

    def _line(
        self, request: BaseRequest, response: web.StreamResponse, series: RouteSeries, time: float
    ) -> None:
        # Never a header or a body, and no query string (it may hold a key). Secrets that
        # still appear (a key in a path) are redacted by the app's log-record hook.
        path = request.raw_path.partition("?")[0]
        if len(path) > _MAX_PATH:
            path = path[:_MAX_PATH] + "..."
        self.logger.info(
            "%s %s %s %d %dB %.1fms route=%s rid=%s",
            request.remote or "-",
            _printable(request.method[:16]),
            _printable(path),
            response.status,
            response.body_length,
            time * 1000.0,
            series.route,
            response.headers.get("x-request-id", "-"),
        )


def _printable(text: str) -> str:
    """``text`` with anything that is not printable ASCII escaped (one log line stays one line)."""
    if text.isascii() and text.isprintable():
        return text
    return text.encode("ascii", "backslashreplace").decode("ascii").replace(" ", "\\x20")


def observer_args(metrics: Metrics, *, count: bool, access_log: bool) -> dict[str, Any]:
    """The app's ``handler_args`` that install the observer (they override the runner's own
    ``access_log``), or turn aiohttp's access logging off when neither is wanted."""
    if not (count or access_log):
        return {"access_log": None}  # aiohttp then does not even read the clock
    observer = type(
        "RequestObserver",
        (_Observer,),
        {"__slots__": (), "metrics": metrics, "routes": {}, "access_log": access_log},
    )
    return {"access_log": ACCESS_LOG, "access_log_class": observer}


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text exposition (counts and timings only)."""
    body = await request.app[STATE].metrics.render()
    siblings = request.app.get(SIBLINGS)
    if siblings is not None:  # (--workers: the whole server's numbers, whichever worker answers)
        body = await siblings.gather(body)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})


async def readiness_endpoint(request: web.Request) -> web.Response:
    """``GET /health/ready``: 200 ``{"status": "ready"}`` once storage is open and working; else 503."""
    readiness = request.app[STATE].readiness
    status = readiness.status()
    body = {"status": status, "storage": {s.name: s.state() for s in readiness.stores}}
    return web.Response(
        status=200 if status == "ready" else 503,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
