"""Section ``mcp``: one MCP tool call round trip through the gateway vs the same call made directly.

Direct: the official SDK's client calls ``echo`` on the demo MCP server (``tests/mcp_demo.py``
over stdio), one call at a time. Gateway: a ``nanobot serve`` with the same server configured
answers a chat completion whose fake upstream asks for ``mcp_demo_echo`` once, then answers with
the tool's result (``toolecho=1``): two upstream calls, one MCP call, and the HTTP request. A
round trip counts only if the answer is the tool's own text for that request.
"""

from __future__ import annotations

import asyncio
import http.client
import statistics
import sys
import time
import uuid
from typing import Any

import orjson

from bench.harness import Bench, gateway_argv
from bench.procs import ROOT, HarnessError, free_port, wait_healthy
from bench.report import Report, Row

SECTION = "9 mcp"
DEMO = ROOT / "tests" / "mcp_demo.py"
UP_TIMEOUT = 60.0


def mcp(b: Bench, r: Report) -> None:
    """Add the MCP round-trip row (median ms, direct vs gateway)."""
    metric = "one MCP tool call round trip, median"
    if not DEMO.exists() or b.gateway_error:
        why = "tests/mcp_demo.py missing" if not DEMO.exists() else "gateway not running"
        r.add(Row(SECTION, metric, unit="ms", note=f"skipped: {why}"))
        return
    n = 20 if b.settings.quick else 200
    direct = asyncio.run(_direct(n))
    proc, port = _launch(b)
    try:
        gateway, wrong = _through_gateway(port, n)
    finally:
        b.children.stop(proc)
    d, g = statistics.median(direct), statistics.median(gateway) if gateway else None
    r.raw["mcp"] = {"direct_ms": direct, "gateway_ms": gateway, "wrong_answers": wrong}
    r.add(
        Row(
            SECTION,
            f"{metric} (stdio demo server, {n} sequential calls)",
            d,
            g,
            "ms",
            compare="added",
            target="every answer is its call's tool result",
            ok=wrong == 0 and bool(gateway),
            note=f"p90 direct {_p90(direct):.2f} / gateway {_p90(gateway):.2f} ms; gateway adds the HTTP "
            "request and two upstream calls" + (f"; {wrong} WRONG answers" if wrong else ""),
        )
    )


async def _direct(n: int) -> list[float]:
    """Milliseconds per ``call_tool`` with the SDK, on a server started for the purpose."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, args=[str(DEMO), "stdio"])
    times = []
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        await session.list_tools()
        for i in range(n + 3):  # the first calls warm up both sides
            t0 = time.perf_counter()
            result = await session.call_tool("echo", {"text": f"direct {i}"})
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
            if result.is_error:
                raise HarnessError(f"direct MCP call failed: {result.content}")
    return times


def _launch(b: Bench) -> tuple[Any, int]:
    """A gateway with the demo server configured, once the server's tools are up."""
    port = free_port()
    path = b.write_config(port)
    config = orjson.loads(path.read_bytes())
    config["agents"]["defaults"]["workspace"] = str(b.tmp / "ws-mcp")  # one gateway per workspace
    config["tools"] = {"mcpServers": {"demo": {"command": sys.executable, "args": [str(DEMO), "stdio"]}}}
    path.write_bytes(orjson.dumps(config))
    started = time.perf_counter()
    proc = b.children.spawn("gateway-mcp", gateway_argv(path), cpus=b.cpus.server)
    wait_healthy(proc, port, started, b.settings.health_timeout)
    log = b.tmp / "gateway-mcp.log"
    deadline = time.monotonic() + UP_TIMEOUT
    while "MCP server demo is up" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline or proc.poll() is not None:
            b.children.stop(proc)
            raise HarnessError(f"the MCP server did not come up:\n{b.children.log_tail('gateway-mcp')}")
        time.sleep(0.02)  # polling another process's log, bounded by the deadline
    return proc, port


def _through_gateway(port: int, n: int) -> tuple[list[float], int]:
    """Milliseconds per chat completion that calls the tool once; and how many answers were wrong."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times, wrong = [], 0
    try:
        for i in range(n + 3):
            nonce = uuid.uuid4().hex[:8]
            text = f'toolecho=1 tool=mcp_demo_echo args={{"text": "{nonce}"}}'
            message = {"role": "user", "content": text}  # a fresh session each: no history to resend
            body = orjson.dumps({"model": "bench-model", "session_id": nonce, "messages": [message]})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            elapsed = (time.perf_counter() - t0) * 1000
            answer = orjson.loads(data)["choices"][0]["message"]["content"] if resp.status == 200 else ""
            if i >= 3:
                times.append(elapsed)
                wrong += answer != f"demo says: {nonce}"
    finally:
        conn.close()
    return times, wrong


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else float("nan")
