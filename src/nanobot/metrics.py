"""What ``GET /metrics`` reports, recorded as it happens and rendered in the Prometheus text
exposition format (version 0.0.4) when scraped.

Hand-written rather than ``prometheus-client``: recording sits on the hot path (every HTTP
request), and here it costs one dict lookup, one ``bisect`` and three additions, with no lock
and no label formatting. The client library takes a lock per update and builds a label tuple
per ``labels()`` call, several times that cost. Each series renders its labels once, when
first seen; numbers are formatted only at scrape time.

Everything here is updated on the event loop's thread, so no lock is needed. Gauges are not
updated at all: a :class:`Family` reads its value from its owner when scraped (open streams,
running turns, outbox depth), so what is idle costs nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds in seconds, shared by every histogram: a health check takes well under a
# millisecond, an agent turn with tools a minute or more.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LE = (*(f'le="{bound!r}"' for bound in BUCKETS), 'le="+Inf"')

Reading = float | Mapping[str, float] | None  # one value, one per label value, or None: not known now
Read = Callable[[], Reading | Awaitable[Reading]]


class Histogram:
    """Observations counted per bucket (not cumulative until rendered), and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(BUCKETS, seconds)] += 1  # the first bound >= seconds: le is inclusive
        self.sum += seconds


class RouteSeries:
    """Requests of one route (method and canonical path): a count per status and their latency."""

    __slots__ = ("labels", "latency", "method", "route", "statuses")

    def __init__(self, method: str, route: str) -> None:
        self.method = method
        self.route = route
        self.labels = f'method="{_escape(method)}",route="{_escape(route)}"'
        self.statuses: dict[int, int] = {}
        self.latency = Histogram()

    def record(self, status: int, seconds: float) -> None:
        """Count one answered request."""
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        latency = self.latency  # Histogram.observe, inlined: this runs for every request
        latency.counts[bisect_left(BUCKETS, seconds)] += 1
        latency.sum += seconds


@dataclass(frozen=True, slots=True)
class Family:
    """A metric read from its owner at scrape time (a gauge, or a counter kept elsewhere).

    ``read`` returns one value (no label), a value per value of ``label``, or None when it
    cannot tell now (the family is left out of that scrape); it may be a coroutine function.
    """

    name: str
    help: str
    read: Read
    label: str = ""
    kind: str = "gauge"


class Metrics:
    """One process's metrics: requests, turns and upstream calls as recorded, plus the watched
    :class:`Family` objects."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], RouteSeries] = {}
        self._turns: dict[str, Histogram] = {}
        self._upstream: dict[str, Histogram] = {}
        self._families: dict[str, Family] = {}
        self.other = self.route("other", "other")  # requests no route matched: one bounded series

    def route(self, method: str, route: str) -> RouteSeries:
        """The series of ``method`` on the canonical ``route`` (created once; the caller caches it)."""
        key = (method, route)
        series = self._routes.get(key)
        if series is None:
            series = self._routes[key] = RouteSeries(method, route)
        return series

    def turn(self, channel: str, seconds: float) -> None:
        """An agent turn on ``channel`` ended (answered or failed) after ``seconds``."""
        hist = self._turns.get(channel)
        if hist is None:
            hist = self._turns[channel] = Histogram()
        hist.counts[bisect_left(BUCKETS, seconds)] += 1  # Histogram.observe, inlined: once per turn
        hist.sum += seconds

    def upstream(self, outcome: str, seconds: float) -> None:
        """One call to the upstream LLM ended with ``outcome`` after ``seconds``."""
        hist = self._upstream.get(outcome)
        if hist is None:
            hist = self._upstream[outcome] = Histogram()
        hist.counts[bisect_left(BUCKETS, seconds)] += 1  # Histogram.observe, inlined: once per call
        hist.sum += seconds

    def watch(self, *families: Family) -> None:
        """Report ``families`` from now on (a family of the same name is replaced)."""
        for family in families:
            self._families[family.name] = family

    @contextlib.contextmanager
    def watching(self, *families: Family) -> Iterator[None]:
        """Report ``families`` while the block runs (their owners exist only that long)."""
        self.watch(*families)
        try:
            yield
        finally:
            for family in families:
                if self._families.get(family.name) is family:
                    del self._families[family.name]

    async def render(self) -> bytes:
        """The exposition: every recorded series and every watched family, read now."""
        out: list[str] = []
        _head(out, "nanobot_http_requests_total", "counter", "HTTP requests answered, by route and status.")
        routes = sorted(self._routes.values(), key=lambda s: (s.route, s.method))
        for series in routes:
            for status, count in sorted(series.statuses.items()):
                out.append(f'nanobot_http_requests_total{{{series.labels},status="{status}"}} {count}')
        _head(out, "nanobot_http_request_duration_seconds", "histogram",
              "Time from a request's head to the end of its answer, by route.")  # fmt: skip
        for series in routes:
            if series.statuses:
                _histogram(out, "nanobot_http_request_duration_seconds", series.labels, series.latency)
        _labelled(out, "nanobot_turn_duration_seconds", "Agent turns (answered or failed), by channel.",
                  "channel", self._turns)  # fmt: skip
        _labelled(out, "nanobot_upstream_request_duration_seconds",
                  "Calls to the upstream LLM, retries included, by outcome "
                  "(ok, error, timeout, context_length, cancelled).", "outcome", self._upstream)  # fmt: skip
        for family in list(self._families.values()):
            await _family(out, family)
        out.append("")
        return "\n".join(out).encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _head(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _histogram(out: list[str], name: str, labels: str, hist: Histogram) -> None:
    total = 0
    prefix = f"{name}_bucket{{{labels}," if labels else f"{name}_bucket{{"
    for le, count in zip(_LE, hist.counts, strict=True):
        total += count
        out.append(f"{prefix}{le}}} {total}")
    suffix = f"{{{labels}}}" if labels else ""
    out.append(f"{name}_sum{suffix} {_number(hist.sum)}")
    out.append(f"{name}_count{suffix} {total}")


def _labelled(out: list[str], name: str, help_text: str, label: str, hists: Mapping[str, Histogram]) -> None:
    _head(out, name, "histogram", help_text)
    for value, hist in sorted(hists.items()):
        _histogram(out, name, f'{label}="{_escape(value)}"', hist)


async def _family(out: list[str], family: Family) -> None:
    try:
        reading = family.read()
        if inspect.isawaitable(reading):
            reading = await reading
    except Exception as exc:  # one unreadable source must not fail the whole scrape
        log.warning("metrics: could not read %s: %s", family.name, exc)
        return
    if reading is None:
        return
    _head(out, family.name, family.kind, family.help)
    if isinstance(reading, Mapping):
        for value, number in sorted(reading.items()):
            out.append(f'{family.name}{{{family.label}="{_escape(value)}"}} {_number(number)}')
    else:
        out.append(f"{family.name} {_number(reading)}")
