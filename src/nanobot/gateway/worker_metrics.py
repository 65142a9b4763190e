"""``GET /metrics`` under ``nanobot serve --workers N``: the whole server, whichever worker answers.

The workers share one port, and the kernel hands a scrape to one of them at random, so each
worker's own numbers alone would jump between scrapes. Each worker therefore also serves its own
exposition on a Unix socket in a folder the supervisor made for them (mode 0700: this user only),
and the worker a scrape lands on reads its siblings' there and adds them up: counters and
histograms are summed, as are the gauges of work in progress; a gauge that every process reports
the same (the shared outbox) or that says whether something holds (channel up, readiness) is
combined as its meaning asks. ``nanobot_workers_answering`` says how many workers were counted
(a worker being restarted is missing until it is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import aiohttp
from aiohttp import web

from nanobot.metrics import Metrics

log = logging.getLogger(__name__)

SIBLING_TIMEOUT = 2.0  # seconds to wait for one sibling's numbers
_COMBINE: dict[str, Callable[[Iterable[float]], float]] = {
    "nanobot_outbox_messages": max,  # the shared outbox: every worker reports the same
    "nanobot_channel_up": max,  # connected somewhere
    "nanobot_ready": min,  # ready only when every worker is
}


class Siblings:
    """This worker's place among the workers: its socket, and its siblings' sockets."""

    __slots__ = ("folder", "own")

    def __init__(self, folder: Path, index: int) -> None:
        self.folder = folder
        self.own = folder / f"{index}.sock"

    async def serve_own(self, metrics: Metrics) -> web.AppRunner:
        """Serve this worker's own numbers on its socket (started; clean up the runner to stop)."""

        async def own(_request: web.Request) -> web.Response:
            return web.Response(body=await metrics.render())

        app = web.Application()
        app.router.add_get("/metrics", own)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        with contextlib.suppress(FileNotFoundError):
            self.own.unlink()  # (left by a worker of this slot that was killed)
        await web.UnixSite(runner, str(self.own)).start()
        return runner

    async def gather(self, own: bytes) -> bytes:
        """``own`` and every sibling's exposition, added up."""
        others = [p for p in self.folder.glob("*.sock") if p != self.own]
        read = await asyncio.gather(*(_read(path) for path in others))
        texts = [own, *(text for text in read if text is not None)]
        return merge(texts)


async def _read(path: Path) -> bytes | None:
    try:
        timeout = aiohttp.ClientTimeout(total=SIBLING_TIMEOUT)
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)), timeout=timeout) as http,
            http.get("http://worker/metrics") as response,
        ):
            if response.status != 200:
                return None
            return await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # (restarting, or gone)
        log.debug("metrics: worker socket %s did not answer: %s", path.name, exc)
        return None


def merge(texts: list[bytes]) -> bytes:
    """Prometheus text expositions of the same families added up, series by series."""
    heads: dict[str, list[str]] = {}  # family -> its HELP and TYPE lines, first seen
    series: dict[str, dict[str, list[float]]] = {}  # family -> series -> each text's value
    for text in texts:
        family = ""
        for line in text.decode().splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                family = parts[2] if len(parts) > 2 else family
                if family not in heads:
                    heads[family], series[family] = [], {}
                if len(heads[family]) < 2:
                    heads[family].append(line)
            elif line and family:
                key, _, value = line.rpartition(" ")
                series[family].setdefault(key, []).append(float(value))
    out: list[str] = []
    for family, lines in heads.items():
        out.extend(lines)
        combine = _COMBINE.get(family, sum)
        out.extend(f"{key} {_number(combine(values))}" for key, values in series[family].items())
    out.append("# HELP nanobot_workers_answering Workers whose numbers this scrape adds up.")
    out.append("# TYPE nanobot_workers_answering gauge")
    out.append(f"nanobot_workers_answering {len(texts)}")
    out.append("")
    return "\n".join(out).encode()


def _number(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    return repr(value) if math.isfinite(value) else ("+Inf" if value > 0 else "-Inf")


SIBLINGS = web.AppKey("nanobot.siblings", Siblings)
