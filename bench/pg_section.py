"""Sections 7 and 8: PostgreSQL storage on one process (against SQLite in the same run), and
``nanobot serve --workers N`` for N = 1, 2, 4 against the same upstream.

Both start a throwaway PostgreSQL from the installed server binaries with the tests' own code
(``tests/pgserver.py``: initdb + pg_ctl in a temporary directory, fsync off); without the
binaries the sections are skipped with a note. Every gateway gets a fresh, empty database.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from bench.cpus import CpuPlan, physical_cores
from bench.harness import Bench, gateway_argv
from bench.procs import ROOT, HarnessError, free_port, read_ready_line, wait_healthy
from bench.report import Report, Row, check

PG_SECTION = "7 PostgreSQL"
WORKERS_SECTION = "8 --workers"
WORKER_COUNTS = (1, 2, 4)
WORKERS_CONCURRENCY = 64
_databases = itertools.count(1)


@functools.cache
def _pgserver() -> ModuleType:
    """``tests/pgserver.py``, loaded by path (no ``tests`` package needed on sys.path)."""
    spec = importlib.util.spec_from_file_location("nanobot_bench_pgserver", ROOT / "tests" / "pgserver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module


@contextmanager
def postgres(r: Report, section: str, cpus: frozenset[int]) -> Iterator[Any]:
    """A running throwaway server (pinned to ``cpus`` when given), or None with a note saying why."""
    pg = _pgserver()
    why = pg.missing()
    if why is not None:
        r.note(f"Section {section} skipped: {why}")
        yield None
        return
    server = pg.start_server()
    try:
        if cpus:  # its backends are forked by the postmaster later: they inherit this
            pid = int((server.root / "data" / "postmaster.pid").read_text().split()[0])
            os.sched_setaffinity(pid, cpus)
        yield server
    finally:
        pg.stop_server(server)


def _database(server: Any) -> str:
    url: str = _pgserver().create_database(server, f"bench_{os.getpid()}_{next(_databases)}")
    return url


def _over_unix_socket(url: str, server: Any) -> str:
    """The same database reached through the server's Unix socket instead of TCP on 127.0.0.1
    (what a gateway on the database's machine would use)."""
    return url.replace(f"@127.0.0.1:{server.port}/", "@/") + f"?host={server.root}&port={server.port}"


def launch(
    b: Bench,
    name: str,
    storage_url: str,
    workers: int = 1,
    cpus: frozenset[int] | None = None,
    upstream_port: int = 0,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``nanobot serve`` on PostgreSQL (``--workers N`` when N > 1) and wait until it serves."""
    port = free_port()
    config = b.write_config(port)
    if upstream_port:
        data = orjson.loads(config.read_bytes())
        data["providers"]["bench"]["apiBase"] = f"http://127.0.0.1:{upstream_port}/v1"
        config.write_bytes(orjson.dumps(data))
    argv = [*gateway_argv(config), "--storage-url", storage_url]
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = b.children.spawn(name, argv, cpus=b.cpus.server if cpus is None else cpus)
    try:
        if workers > 1:  # the supervisor says when every worker listens
            _wait_log(b.tmp / f"{name}.log", "workers ready", proc, b.settings.health_timeout + 30)
        else:
            wait_healthy(proc, port, time.perf_counter(), b.settings.health_timeout)
    except HarnessError as exc:
        b.children.stop(proc)
        raise HarnessError(f"{exc}\n--- {name} log ---\n{b.children.log_tail(name)}") from None
    return proc, port


def _wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None:
            raise HarnessError(f"nanobot serve exited with code {proc.returncode} before {text!r}")
        if time.monotonic() > deadline:
            raise HarnessError(f"no {text!r} within {timeout:.0f} s")
        time.sleep(0.05)  # a starting process's log, polled with a deadline


Result = dict[str, Any]


def _median(runs: list[Result], key: str) -> Result:
    """The run whose ``key`` is the median (its other numbers come with it)."""
    ordered = sorted(runs, key=lambda x: float(x[key]))
    return ordered[(len(ordered) - 1) // 2]


def pg(b: Bench, r: Report) -> None:
    """Section 7: one process on PostgreSQL vs SQLite, same run: c=16 throughput, c=1 latency."""
    if not b.gateway_pid:
        r.note(f"Section {PG_SECTION} skipped: the gateway does not run")
        return
    s = b.settings
    with postgres(r, PG_SECTION, b.cpus.loadgen) as server:
        if server is None:
            return
        runs: dict[tuple[str, int], list[Result]] = {}
        for _ in range(s.repeats):
            for conc in (1, 16):
                spec = {"kind": "closed", "concurrency": conc, "duration": s.duration, "warmup": s.warmup}
                b.restart_gateway()  # SQLite, fresh workspace
                runs.setdefault(("sqlite", conc), []).append(b.load({**spec, "url": b.gateway_url}))
                for kind in ("pg", "pg-unix"):
                    database = _database(server)
                    if kind == "pg-unix":
                        database = _over_unix_socket(database, server)
                    proc, port = launch(b, "gateway-pg", database)
                    try:
                        url = f"http://127.0.0.1:{port}/v1/chat/completions"
                        runs.setdefault((kind, conc), []).append(b.load({**spec, "url": url}))
                    finally:
                        b.children.stop(proc)
        r.raw["pg"] = {f"{k}_c{c}": v for (k, c), v in runs.items()}
        _pg_rows(r, runs)
    r.note(
        f"Section {PG_SECTION}: the same gateway with storage.url = a local throwaway PostgreSQL "
        f"(fsync off; pinned with the load generator when pinning), against SQLite in the same run; "
        f"medians of {s.repeats}, each on a fresh gateway and database."
    )


_TRANSPORTS = (("pg", "PostgreSQL (TCP, 127.0.0.1)"), ("pg-unix", "PostgreSQL (its Unix socket)"))


def _pg_rows(r: Report, runs: dict[tuple[str, int], list[Result]]) -> None:
    lite = _median(runs[("sqlite", 16)], "rps")
    for kind, name in _TRANSPORTS:
        pg16 = _median(runs[(kind, 16)], "rps")
        share = pg16["rps"] / lite["rps"] if lite["rps"] else None
        r.add(
            Row(
                PG_SECTION,
                f"c=16 distinct sessions: throughput on {name}",
                None,
                pg16["rps"],
                "req/s",
                target=">= 70% of SQLite",
                ok=check(share, lambda v: v >= 0.7),
                note=f"SQLite {lite['rps']:,.0f} req/s; PostgreSQL {100 * (share or 0):.0f}% of it",
            )
        )
    lite1 = _median(runs[("sqlite", 1)], "p50_ms")
    for kind, name in _TRANSPORTS:
        pg1 = _median(runs[(kind, 1)], "p50_ms")
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            added = pg1[key] - lite1[key]
            r.add(
                Row(
                    PG_SECTION,
                    f"c=1 {label} latency on {name}",
                    None,
                    pg1[key],
                    "ms",
                    note=f"SQLite {lite1[key]:.3f} ms: PostgreSQL adds {added:+.3f} ms per request",
                )
            )
    failed = sum(x["errors"] for v in runs.values() for x in v)
    if failed:
        sample = next(x["error_sample"] for v in runs.values() for x in v if x["errors"])
        r.add(Row(PG_SECTION, "failed requests", None, failed, target="0", ok=False, note=sample[:120]))


@dataclasses.dataclass(frozen=True, slots=True)
class WorkersPlan:
    """CPUs for the workers section: upstream, the N workers, PostgreSQL, load generator."""

    upstream: frozenset[int]
    workers: tuple[int, ...]  # one logical CPU per worker, on separate physical cores
    postgres: frozenset[int]
    loadgen: frozenset[int]
    note: str

    @property
    def pinned(self) -> bool:
        return bool(self.workers)


def plan_workers(base: CpuPlan, most: int) -> WorkersPlan:
    """Pin where the machine has ``most`` + 4 physical cores (and pinning is on), else not."""
    none: frozenset[int] = frozenset()
    if not base.pinned:
        return WorkersPlan(none, (), none, none, "not pinned: " + base.note.split(": ", 1)[-1])
    cores = physical_cores(set(os.sched_getaffinity(0)))
    if len(cores) < most + 4:
        why = f"{len(cores)} physical cores are fewer than {most} workers + upstream (2) + PostgreSQL + load"
        return WorkersPlan(none, (), none, none, f"not pinned: {why}")
    workers = tuple(core[0] for core in cores[-most:])
    upstream = frozenset(cpu for core in cores[-most - 2 : -most] for cpu in core)
    postgres_cpus = frozenset(cores[-most - 3])
    loadgen = frozenset(cpu for core in cores[: -most - 3] for cpu in core)
    note = (
        f"pinned: worker k on CPU {', '.join(map(str, workers))} (k = 1..{most}, one physical core each), "
        f"upstream on {sorted(upstream)}, PostgreSQL on {sorted(postgres_cpus)}, load on {sorted(loadgen)}"
    )
    return WorkersPlan(upstream, workers, postgres_cpus, loadgen, note)


def _start_upstreams(b: Bench, cpus: frozenset[int]) -> int:
    """One fake upstream process per upstream CPU (at least one), sharing a port; the port."""
    port = 0
    for i in range(max(1, len(cpus))):
        argv = [sys.executable, "-m", "bench.upstream", "--reuse-port", "--port", str(port)]
        proc = b.children.spawn(f"upstream-w{i}", argv, cpus=cpus, stdout_pipe=True)
        port = int(read_ready_line(proc, timeout=15)[0])
    return port


def workers(b: Bench, r: Report) -> None:
    """Section 8: req/s of ``nanobot serve --workers N`` (PostgreSQL) for N = 1, 2, 4."""
    if b.gateway_error:
        r.note(f"Section {WORKERS_SECTION} skipped: the gateway does not run")
        return
    s = b.settings
    plan = plan_workers(b.cpus, max(WORKER_COUNTS))
    saved = b.cpus
    b.cpus = dataclasses.replace(b.cpus, loadgen=plan.loadgen)  # b.load pins the load generator
    try:
        with postgres(r, WORKERS_SECTION, plan.postgres) as server:
            if server is None:
                return
            upstream = _start_upstreams(b, plan.upstream)
            spec = {"kind": "closed", "concurrency": WORKERS_CONCURRENCY, "duration": s.duration}
            spec["warmup"] = s.warmup
            direct = b.load({**spec, "url": f"http://127.0.0.1:{upstream}/v1/chat/completions"})
            results: dict[int, list[Result]] = {}
            for _ in range(s.repeats):
                for n in WORKER_COUNTS:
                    cpus = frozenset(plan.workers[:n])
                    proc, port = launch(b, f"workers-{n}", _database(server), n, cpus, upstream)
                    try:
                        url = f"http://127.0.0.1:{port}/v1/chat/completions"
                        results.setdefault(n, []).append(b.load({**spec, "url": url}))
                    finally:
                        b.children.stop(proc, grace=30)
            r.raw["workers"] = {"direct": direct, **{f"n{n}": v for n, v in results.items()}}
            _workers_rows(r, plan, direct, results)
    finally:
        b.cpus = saved


def _workers_rows(r: Report, plan: WorkersPlan, direct: Result, results: dict[int, list[Result]]) -> None:
    one = statistics.median(x["rps"] for x in results[1])
    for n, runs in results.items():
        rps = statistics.median(x["rps"] for x in runs)
        row = r.add(
            Row(
                WORKERS_SECTION,
                f"--workers {n}: c={WORKERS_CONCURRENCY} throughput",
                direct["rps"],
                rps,
                "req/s",
                note=f"{rps / one:.2f}x --workers 1" if one else "",
            )
        )
        if n == 4:
            row.target = ">= 3x --workers 1 (pinned, 8+ physical cores)"
            row.ok = check(rps / one if one else None, lambda v: v >= 3) if plan.pinned else None
        failed = sum(x["errors"] for x in runs)
        if failed:
            row.ok, row.note = False, f"{failed} failed: {runs[0]['error_sample'][:100]}"
    bound = "" if plan.pinned else (
        " Unpinned, the load generator, the upstream, PostgreSQL and the workers share the same few "
        "cores: the figures are bounded by the machine (load generator included), not by the workers, "
        "and more workers add contention, not capacity (the direct column is the load generator "
        "against the upstream alone)."
    )  # fmt: skip
    r.note(
        f"Section {WORKERS_SECTION}: `nanobot serve --workers N` on PostgreSQL, c={WORKERS_CONCURRENCY} "
        f"distinct sessions, fresh database each, medians of {len(results[1])}; the upstream runs one "
        f"process per upstream CPU on one port; {plan.note}.{bound}"
    )
