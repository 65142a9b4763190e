"""The load generator, run in its own process: ``python -m bench.loadgen '<json spec>'``.

It prints one JSON object (the scenario's result) on stdout. Scenarios (``spec["kind"]``):

* ``closed``      - closed-loop non-stream requests: ``concurrency`` workers for ``duration``
  seconds after ``warmup`` seconds, each request on its own session (``session: "distinct"``)
  or all on one (``"shared"``); throughput, latency percentiles, per-worker fairness.
* ``ttfb``        - ``n`` sequential streams: time to the first ``data:`` line.
* ``stream_rate`` - ``n`` sequential streams of ``deltas`` deltas: deltas/s counted here.
* ``streams``     - ``n`` streams opened at once: how many complete, and how long they take.
* ``multipart``   - ``n`` sequential multipart uploads of one file: request time. With
  ``expect`` (``{"min_chars": N, "vocab": [...], "min_words": K}``) the message asks the fake
  upstream for a report (``report=1``) and an upload only counts if that report shows the file's
  label and extracted text (at least N characters, K words of ``vocab``) reached the model.

Every loop is bounded by a request count and a deadline; each request has a timeout.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from typing import Any

import aiohttp
import orjson

from bench.upstream import run_loop

JSON_HEADERS = {"Content-Type": "application/json"}
MAX_REQUESTS = 2_000_000


def percentiles(values_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/max (milliseconds) of ``values_ns``."""
    if not values_ns:
        return {
            "p50_ms": float("nan"),
            "p90_ms": float("nan"),
            "p99_ms": float("nan"),
            "max_ms": float("nan"),
        }
    s = sorted(values_ns)

    def at(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))] / 1e6

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": s[-1] / 1e6}


def _body(session_id: str, content: str, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": "bench-model",
        "messages": [{"role": "user", "content": content}],
        "session_id": session_id,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


class SseCount:
    """What a client saw of one SSE stream."""

    __slots__ = ("chars", "deltas", "done", "t_first")

    def __init__(self) -> None:
        self.deltas = 0
        self.chars = 0
        self.done = False
        self.t_first = 0


async def read_sse(resp: aiohttp.ClientResponse) -> SseCount:
    """Read an SSE body to its end, counting content deltas; ``t_first`` = first ``data:`` line."""
    seen = SseCount()
    rest = b""
    loads = orjson.loads
    async for chunk in resp.content.iter_any():
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            if not seen.t_first:
                seen.t_first = time.perf_counter_ns()
            payload = line[5:].strip()
            if payload == b"[DONE]":
                seen.done = True
                continue
            try:
                choices = loads(payload).get("choices") or ()
            except orjson.JSONDecodeError:
                continue
            for choice in choices:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    seen.deltas += 1
                    seen.chars += len(text)
    return seen


class Errors:
    """Counts failed requests by kind, keeping one sample message."""

    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, int] = {}
        self.sample = ""

    def add(self, kind: str, detail: str) -> None:
        """Record one failure."""
        self.count += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if not self.sample:
            self.sample = f"{kind}: {detail[:300]}"

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"errors": self.count, "error_kinds": self.kinds, "error_sample": self.sample}


def _session(limit: int, timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=None, force_close=False)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), skip_auto_headers=("User-Agent",)
    )


async def closed_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop non-stream load; see the module docstring."""
    url, conc = spec["url"], int(spec["concurrency"])
    shared = spec.get("session", "distinct") == "shared"
    validate = bool(spec.get("validate", True))
    content = spec.get("content", "hi")
    run = uuid.uuid4().hex[:8]
    start = time.perf_counter()
    measure_from = start + float(spec.get("warmup", 0.5))
    end = measure_from + float(spec["duration"])
    max_requests = int(spec.get("max_requests", MAX_REQUESTS))
    lat: list[int] = []
    per_worker = [0] * conc
    worker_max = [0] * conc
    errors = Errors()
    issued = 0

    async def worker(w: int, http: aiohttp.ClientSession) -> None:
        nonlocal issued
        i = 0
        while issued < max_requests:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            issued += 1
            i += 1
            sid = f"bench-{run}-shared" if shared else f"bench-{run}-{w}-{i}"
            t0n = time.perf_counter_ns()
            try:
                async with http.post(url, data=_body(sid, content, False), headers=JSON_HEADERS) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.add(type(exc).__name__, str(exc))
                continue
            dt = time.perf_counter_ns() - t0n
            if status != 200:
                errors.add(f"http {status}", raw.decode(errors="replace"))
            elif validate and not _valid_completion(raw):
                errors.add("invalid body", raw.decode(errors="replace"))
            elif t0 >= measure_from:
                lat.append(dt)
                per_worker[w] += 1
                worker_max[w] = max(worker_max[w], dt)

    async with _session(conc, float(spec.get("timeout", 30))) as http:
        t_wall = time.perf_counter()
        await asyncio.gather(*(worker(w, http) for w in range(conc)))
        t_done = time.perf_counter()
    measured = max(1e-9, min(t_done, end) - measure_from) if t_done > measure_from else t_done - t_wall
    return {
        "kind": "closed",
        "concurrency": conc,
        "session": "shared" if shared else "distinct",
        "requests": len(lat),
        "seconds": round(measured, 3),
        "rps": len(lat) / measured,
        **percentiles(lat),
        **errors.as_dict(),
        "per_worker_min": min(per_worker),
        "per_worker_max": max(per_worker),
        "worker_max_wait_ms": [round(x / 1e6, 2) for x in worker_max],
    }


def _valid_completion(raw: bytes) -> bool:
    """A whole chat.completion with a non-empty answer that finished normally (an error, an
    empty reply or a truncated body sent with status 200 must not count as a success)."""
    try:
        body = orjson.loads(raw)
        choice = body["choices"][0]
        content = choice["message"]["content"]
        return (
            body["object"] == "chat.completion"
            and isinstance(content, str)
            and bool(content)
            and choice["finish_reason"] == "stop"
        )
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return False


def text_seen_upstream(raw: bytes, label: str, expect: dict[str, Any]) -> str:
    """Why the fake upstream's ``report=1`` answer does not show the file's text, or "" if it does."""
    try:
        report = orjson.loads(orjson.loads(raw)["choices"][0]["message"]["content"])
        chars, excerpt = int(report["chars"]), str(report["excerpt"])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return f"no upstream report in the answer: {raw[:200]!r}"
    if not excerpt.startswith(f"[File: {label}]"):
        return f"the model never saw the [File: {label}] block: {excerpt[:120]!r}"
    if chars < int(expect["min_chars"]):
        return f"the model saw only {chars} characters of text"
    words = set(excerpt.split())
    found = sum(1 for w in expect["vocab"] if w in words)
    if found < int(expect["min_words"]):
        return f"the extracted text has {found} of the document's words: {excerpt[:120]!r}"
    return ""


async def _one_stream(
    http: aiohttp.ClientSession, url: str, body: bytes, errors: Errors
) -> tuple[int, SseCount]:
    """POST one streaming request; return (start ns, counts) — counts empty on error."""
    t0 = time.perf_counter_ns()
    try:
        async with http.post(url, data=body, headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                errors.add(f"http {resp.status}", (await resp.read()).decode(errors="replace"))
                return t0, SseCount()
            return t0, await read_sse(resp)
    except (aiohttp.ClientError, TimeoutError) as exc:
        errors.add(type(exc).__name__, str(exc))
        return t0, SseCount()


async def ttfb(spec: dict[str, Any]) -> dict[str, Any]:
    """Sequential streams: time to the first ``data:`` line and to the end."""
    url, n = spec["url"], int(spec["n"])
    content = spec.get("content", "deltas=4 delay_ms=0")
    run = uuid.uuid4().hex[:8]
    errors = Errors()
    first: list[int] = []
    total: list[int] = []
    deadline = time.perf_counter() + float(spec.get("max_seconds", 60))
    async with _session(1, float(spec.get("timeout", 30))) as http:
        for i in range(n + int(spec.get("warmup_n", 10))):
            if time.perf_counter() > deadline:
                break
            t0, seen = await _one_stream(http, url, _body(f"bench-{run}-t{i}", content, True), errors)
            t_end = time.perf_counter_ns()
            if i >= int(spec.get("warmup_n", 10)) and seen.done and seen.t_first:
                first.append(seen.t_first - t0)
                total.append(t_end - t0)
    return {
        "kind": "ttfb",
        "streams": len(first),
        **percentiles(first),
        "total_p50_ms": percentiles(total)["p50_ms"],
        **errors.as_dict(),
    }


async def stream_rate(spec: dict[str, Any]) -> dict[str, Any]:
    """Sequential long streams: deltas per second counted at the client (median of ``n``)."""
    url, n, deltas = spec["url"], int(spec["n"]), int(spec["deltas"])
    run = uuid.uuid4().hex[:8]
    errors = Errors()
    rates: list[float] = []
    events: list[int] = []
    complete = 0
    content = f"deltas={deltas} delay_ms=0"
    async with _session(1, float(spec.get("timeout", 60))) as http:
        for i in range(n + 1):  # the first one warms up
            t0, seen = await _one_stream(http, url, _body(f"bench-{run}-r{i}", content, True), errors)
            elapsed = (time.perf_counter_ns() - t0) / 1e9
            ok = seen.done and seen.chars == deltas * 4
            if i == 0:
                continue
            complete += ok
            if ok:
                # The upstream's deltas ("tok " each) relayed per second: the gateway coalesces
                # deltas that queue up (issue 8), so the client's event count is not the measure.
                rates.append(deltas / elapsed)
                events.append(seen.deltas)
    rates.sort()
    return {
        "kind": "stream_rate",
        "deltas": deltas,
        "streams": n,
        "complete": complete,
        "deltas_per_s": rates[len(rates) // 2] if rates else 0.0,
        "events_per_stream": sorted(events)[len(events) // 2] if events else 0,
        "deltas_per_s_min": rates[0] if rates else 0.0,
        **errors.as_dict(),
    }


async def many_streams(spec: dict[str, Any]) -> dict[str, Any]:
    """``n`` streams at once, each of ``deltas`` deltas ``delay_ms`` apart: how many complete."""
    url, n = spec["url"], int(spec["n"])
    deltas, delay = int(spec["deltas"]), int(spec["delay_ms"])
    content = f"deltas={deltas} delay_ms={delay}"
    run = uuid.uuid4().hex[:8]
    errors = Errors()
    async with _session(0, float(spec.get("timeout", 60))) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(_one_stream(http, url, _body(f"bench-{run}-s{i}", content, True), errors) for i in range(n))
        )
        wall = time.perf_counter() - t0
    # Whole text and [DONE]: deltas that queued up may arrive coalesced into fewer events.
    complete = sum(1 for _, s in results if s.done and s.chars == deltas * 4)
    firsts = [s.t_first - t for t, s in results if s.t_first]
    return {
        "kind": "streams",
        "streams": n,
        "complete": complete,
        "wall_s": round(wall, 3),
        "ideal_s": deltas * delay / 1000,
        "ttfb_p99_ms": percentiles(firsts)["p99_ms"],
        **errors.as_dict(),
    }


async def multipart(spec: dict[str, Any]) -> dict[str, Any]:
    """``n`` rounds of ``parallel`` concurrent multipart uploads of ``file``: request times (ms)."""
    url, n, path = spec["url"], int(spec["n"]), spec["file"]
    parallel = int(spec.get("parallel", 1))
    data = await asyncio.to_thread(_read, path)
    name = os.path.basename(path)
    mime = spec.get("mime", "application/octet-stream")
    expect = spec.get("expect")
    message = spec.get("message", "summarize the attachment") + (" report=1" if expect else "")
    errors = Errors()
    times: list[int] = []
    run = uuid.uuid4().hex[:8]

    async def upload(http: aiohttp.ClientSession, sid: str) -> None:
        form = aiohttp.FormData()
        form.add_field("message", message)
        form.add_field("session_id", sid)
        form.add_field("model", "bench-model")
        form.add_field("files", data, filename=name, content_type=mime)
        t0 = time.perf_counter_ns()
        try:
            async with http.post(url, data=form) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    errors.add(f"http {resp.status}", raw.decode(errors="replace"))
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors.add(type(exc).__name__, str(exc))
            return
        elapsed = time.perf_counter_ns() - t0
        unseen = text_seen_upstream(raw, name, expect) if expect else ""
        if unseen:
            errors.add("text not seen upstream", unseen)
            return
        times.append(elapsed)

    async with _session(parallel, float(spec.get("timeout", 60))) as http:
        for i in range(n):
            await asyncio.gather(*(upload(http, f"bench-{run}-m{i}-{j}") for j in range(parallel)))
    return {
        "kind": "multipart",
        "file": name,
        "bytes": len(data),
        "ok": len(times),
        **percentiles(times),
        **errors.as_dict(),
    }


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


SCENARIOS = {
    "closed": closed_loop,
    "ttfb": ttfb,
    "stream_rate": stream_rate,
    "streams": many_streams,
    "multipart": multipart,
}


def main() -> None:
    """Run the scenario in ``sys.argv[1]`` (JSON) and print its result as JSON."""
    spec = orjson.loads(sys.argv[1])
    result = run_loop(SCENARIOS[spec["kind"]](spec))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
