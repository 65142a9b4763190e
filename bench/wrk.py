"""Optional ``wrk`` client for the non-stream, distinct-session points of section 1.

wrk is a C load generator: it spends far less CPU per request than the Python client, so on
a 2-core box more of the machine is left to the server under test. A Lua script gives every
request its own ``session_id``, checks every response body (a 200 only counts if it is a
chat.completion carrying the fake upstream's answer), and prints the summary as one JSON line.
It cannot report per-connection fairness, so the shared-session point stays in Python.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson

from bench.procs import Children, HarnessError

LUA = r"""
local counter = 0
local prefix = "bench-wrk-" .. tostring(os.time()) .. "-"
local threads = {}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
setup = function(thread)
  table.insert(threads, thread)
end
invalid = 0
-- A 200 counts only with a whole completion whose answer is the fake upstream's "tok".
response = function(status, headers, body)
  if status == 200 and not (string.find(body, '"object":"chat.completion"', 1, true)
      and string.find(body, '"content":"tok"', 1, true)
      and string.find(body, '"finish_reason":"stop"', 1, true)) then
    invalid = invalid + 1
  end
end
request = function()
  counter = counter + 1
  local body = '{"model":"bench-model","messages":[{"role":"user","content":"hi"}],"session_id":"'
    .. prefix .. counter .. '"}'
  return wrk.format(nil, nil, nil, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("invalid") or 0)
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"status":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"invalid":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect, e.read, e.write, e.timeout, bad))
end
"""


def wrk_path() -> str | None:
    """The ``wrk`` executable, if installed."""
    return shutil.which("wrk")


def _run(
    children: Children, script: Path, url: str, conc: int, seconds: float, cpus: frozenset[int]
) -> dict[str, Any]:
    wrk = wrk_path()
    assert wrk is not None
    argv = [
        wrk,
        "-t1",
        f"-c{conc}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    proc = children.spawn("wrk", argv, cpus=cpus, stdout_pipe=True)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        children.stop(proc)
        raise HarnessError("wrk ran past its deadline") from None
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("WRKJSON "):
            data: dict[str, Any] = orjson.loads(line[8:])
            return data
    raise HarnessError(f"wrk printed no summary (exit {proc.returncode}): {children.log_tail('wrk', 3)}")


def wrk_closed(
    children: Children,
    tmp: Path,
    url: str,
    conc: int,
    warmup: float,
    seconds: float,
    cpus: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """A warm-up run, then a measured run; the result has the Python client's keys."""
    script = tmp / "bench.lua"
    script.write_text(LUA)
    if warmup > 0:
        _run(children, script, url, conc, warmup, cpus)
    w = _run(children, script, url, conc, seconds, cpus)
    errors = w["status"] + w["connect"] + w["read"] + w["write"] + w["timeout"] + w["invalid"]
    good = w["requests"] - w["status"] - w["invalid"]
    secs = w["duration_us"] / 1e6
    return {
        "kind": "closed",
        "client": "wrk",
        "concurrency": conc,
        "session": "distinct",
        "requests": good,
        "seconds": round(secs, 3),
        "rps": good / secs if secs else 0.0,
        "p50_ms": w["p50_us"] / 1000,
        "p90_ms": w["p90_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "errors": errors,
        "error_kinds": {
            k: w[k] for k in ("status", "connect", "read", "write", "timeout", "invalid") if w[k]
        },
        "error_sample": f"wrk errors {w}" if errors else "",
    }
