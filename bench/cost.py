"""Instructions per request, counted by callgrind: ``python -m bench.cost``.

Wall-clock throughput on a shared or small machine moves with whatever else runs; the
number of instructions a server executes per request does not. This runs the floor proxy
(:mod:`bench.floor`) and the gateway under ``valgrind --tool=callgrind`` (instrumentation
off while they start), sends a warm-up, then switches counting on for exactly ``--n``
requests at each concurrency, and prints instructions per request for each, and the
gateway's cost over the floor's. Every thread of the process counts (the SQLite writer too).
The answers are checked like the benchmark's (a bad 200 is an error).

``--proc`` runs both without valgrind and counts, from ``/proc``, CPU time (user + system, so
the kernel's share too) and context switches (every thread) per request: the thread hops
callgrind cannot see.

``--sessions K`` first sends K uncounted requests on distinct sessions (state growth: does
a gateway with K sessions behind it cost more per request?).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench.harness import Bench, Settings
from bench.loadgen import _valid_completion
from bench.procs import HarnessError, free_port, read_ready_line, wait_healthy


def _callgrind(argv: list[str], out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--dump-instr=no",
        f"--callgrind-out-file={out}",
        *argv,
    ]


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def _total(out: Path, keep: Path | None = None, tag: str = "") -> int:
    """The summed ``Ir`` of every dump (one per thread) written so far, then remove them
    (or move them into ``keep``, named by ``tag``, for ``callgrind_annotate``)."""
    total = 0
    for path in out.parent.glob(out.name + "*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total += int(line.split()[1])
                break
        if keep is not None and tag:
            shutil.move(path, keep / f"{tag}{path.name.removeprefix(out.name)}")
        else:
            path.unlink()
    return total


async def drive(url: str, n: int, conc: int, tag: str) -> int:
    """Send ``n`` requests, ``conc`` at a time, each on its own session; return how many failed."""
    failed = 0
    issued = 0

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal failed, issued
        while issued < n:
            issued += 1
            sid = f"cost-{tag}-{issued}"
            body = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "session_id": sid})
            async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                raw = await resp.read()
                if resp.status != 200 or not _valid_completion(raw):
                    failed += 1

    connector = aiohttp.TCPConnector(limit=conc)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(worker(http) for _ in range(conc)))
    return failed


def _proc_counts(pid: int) -> tuple[float, float, int]:
    """(user CPU seconds, system CPU seconds, context switches) of ``pid`` so far, all threads."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    user, system = int(fields[11]) / tick, int(fields[12]) / tick
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return user, system, switches


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of ``pid``'s main thread (the event loop) and of its
    other threads together (the SQLite writer; Python does not name OS threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = {"loop": 0.0, "threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # (a thread that ended meanwhile)
        cpu["loop" if task.name == str(pid) else "threads"] += (int(fields[11]) + int(fields[12])) / tick
    return cpu


def measure_proc(name: str, pid: int, url: str, args: argparse.Namespace) -> dict[str, float]:
    """CPU microseconds and context switches per request of ``pid`` at each concurrency."""
    asyncio.run(drive(url, args.warmup, 4, f"{name}-warm"))
    result: dict[str, float] = {}
    for conc in args.conc:
        user0, sys0, sw0 = _proc_counts(pid)
        threads0 = _thread_cpu(pid)
        failed = asyncio.run(drive(url, args.n, conc, f"{name}-c{conc}-{time.monotonic_ns()}"))
        user1, sys1, sw1 = _proc_counts(pid)
        for thread, seconds in _thread_cpu(pid).items():
            result[f"c{conc}_{thread}_us"] = (seconds - threads0[thread]) * 1e6 / args.n
        if failed:
            raise HarnessError(f"{name}: {failed} of {args.n} requests failed at c={conc}")
        result[f"c{conc}_cpu_us"] = (user1 - user0 + sys1 - sys0) * 1e6 / args.n
        result[f"c{conc}_system_us"] = (sys1 - sys0) * 1e6 / args.n
        result[f"c{conc}_switches"] = (sw1 - sw0) / args.n
    return result


def measure(name: str, pid: int, url: str, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Instructions per request of the process ``pid`` at each concurrency."""
    asyncio.run(drive(url, args.warmup, 4, f"{name}-warm"))
    if args.sessions:
        asyncio.run(drive(url, args.sessions, 16, f"{name}-state"))
    result: dict[str, float] = {}
    for conc in args.conc:
        _control(pid, "--zero")
        _total(out)
        _control(pid, "--instr=on")
        failed = asyncio.run(drive(url, args.n, conc, f"{name}-c{conc}-{time.monotonic_ns()}"))
        _control(pid, "--dump")
        _control(pid, "--instr=off")
        if failed:
            raise HarnessError(f"{name}: {failed} of {args.n} requests failed at c={conc}")
        result[f"c{conc}"] = _total(out, args.keep, f"{name}-c{conc}") / args.n
    return result


def run_proc(args: argparse.Namespace) -> int:
    """``--proc``: floor and gateway without valgrind, counted from ``/proc``."""
    results: dict[str, dict[str, float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="nanobot-cost-") as tmp,
        Bench(Path(tmp), Settings.make(True), pin=False) as bench,
    ):
        bench.start_upstream()
        if args.only in (None, "floor"):
            bench.start_floor()
            assert bench.floor is not None
            results["floor"] = measure_proc("floor", bench.floor.pid, bench.floor_url, args)
        if args.only in (None, "gateway"):
            if not bench.start_gateway():
                raise HarnessError(bench.gateway_error)
            results["gateway"] = measure_proc("gateway", bench.gateway_pid, bench.gateway_url, args)
    for name, per in results.items():
        print(f"{name:8s} " + ", ".join(f"{k}: {v:.2f}" for k, v in per.items()))
    print(orjson.dumps({"n": args.n, "results": results}).decode())
    return 0


def _measure_pg(bench: Bench, tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    """The gateway with storage.url on a throwaway PostgreSQL (tests/pgserver.py); only the
    gateway's instructions count (the server's backends are other processes)."""
    from bench.pg_section import _database, _pgserver  # (loads tests/pgserver.py by path)

    pg = _pgserver()
    why = pg.missing()
    if why is not None:
        raise HarnessError(f"--pg: {why}")
    server = pg.start_server()
    try:
        out = tmp / "cg-gateway-pg.out"
        port = free_port()
        config = bench.write_config(port)
        started = time.perf_counter()
        storage = ["--storage-url", _database(server)]
        argv_g = [sys.executable, "-m", "nanobot", "serve", "-c", str(config), *storage]
        proc = bench.children.spawn("gateway-pg", _callgrind(argv_g, out))
        wait_healthy(proc, port, started, 300)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        pg_args = argparse.Namespace(**{**vars(args), "sessions": max(args.sessions, 200)})
        result = measure("gateway-pg", proc.pid, url, out, pg_args)
        bench.children.stop(proc)
        return result
    finally:
        pg.stop_server(server)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="counted requests per concurrency")
    p.add_argument("--warmup", type=int, default=200, help="uncounted requests first")
    p.add_argument("--sessions", type=int, default=0, help="uncounted distinct sessions before counting")
    p.add_argument("--conc", default="1,16", help="concurrencies, comma-separated")
    p.add_argument("--only", choices=("floor", "gateway"), default=None)
    p.add_argument("--proc", action="store_true", help="CPU time and context switches, no valgrind")
    p.add_argument(
        "--pg",
        action="store_true",
        help="also count the gateway on a throwaway PostgreSQL (storage.url), after 200 requests at c=16 "
        "(its pool grows first: a new connection's SCRAM handshake is not a request's cost)",
    )
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the callgrind dumps in this folder (NAME-cC.N per thread) for callgrind_annotate",
    )
    args = p.parse_args(argv)
    args.conc = [int(c) for c in args.conc.split(",")]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    if args.proc:
        return run_proc(args)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed", file=sys.stderr)
        return 1
    results: dict[str, dict[str, float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="nanobot-cost-") as tmp,
        Bench(Path(tmp), Settings.make(True), pin=False) as bench,
    ):
        bench.settings = Settings.make(True)
        bench.start_upstream()
        api_base = f"http://127.0.0.1:{bench.upstream_port}/v1"
        if args.only in (None, "floor"):
            out = Path(tmp) / "cg-floor.out"
            port = free_port()
            argv_f = [sys.executable, "-m", "bench.floor", "--upstream", api_base, "--port", str(port)]
            proc = bench.children.spawn("floor", _callgrind(argv_f, out), stdout_pipe=True)
            read_ready_line(proc, timeout=300)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            results["floor"] = measure("floor", proc.pid, url, out, args)
            bench.children.stop(proc)
        if args.only in (None, "gateway"):
            out = Path(tmp) / "cg-gateway.out"
            port = free_port()
            config = bench.write_config(port)
            started = time.perf_counter()
            argv_g = [sys.executable, "-m", "nanobot", "serve", "-c", str(config)]
            proc = bench.children.spawn("gateway", _callgrind(argv_g, out))
            wait_healthy(proc, port, started, 300)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            results["gateway"] = measure("gateway", proc.pid, url, out, args)
            bench.children.stop(proc)
        if args.pg:
            results["gateway-pg"] = _measure_pg(bench, Path(tmp), args)
    for name, per in results.items():
        line = ", ".join(f"{k}: {v / 1e6:.3f} M instr/request" for k, v in per.items())
        print(f"{name:8s} {line}")
    if "floor" in results and "gateway" in results:
        for k, g in results["gateway"].items():
            f = results["floor"][k]
            added = (g - f) / 1e6
            print(f"{k}: gateway adds {added:.3f} M instr/request over the floor ({g / f:.2f}x the floor)")
    if "gateway" in results and "gateway-pg" in results:
        for k, g in results["gateway-pg"].items():
            added = (g - results["gateway"][k]) / 1e6
            print(f"{k}: PostgreSQL adds {added:.3f} M instr/request over SQLite (the gateway's side only)")
    print(orjson.dumps({"n": args.n, "sessions": args.sessions, "results": results}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
