"""What a turn's storage costs on PostgreSQL, without HTTP or a model: ``python -m bench.pg_turns``.

Starts a throwaway PostgreSQL (``tests/pgserver.py``, fsync off), then, in a fresh process per
concurrency on a fresh database, runs ``--n`` turns on distinct sessions through the session
store exactly as a request does (take the session's lease, read its history, write the turn,
which gives the lease back), ``--conc`` at a time. Prints turns per second, the PostgreSQL
server's CPU per turn (all its processes, from ``/proc``) and this process's CPU per turn.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.pg_section import _pgserver
from bench.procs import ROOT

TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def server_cpu(root: Path) -> float:
    """CPU seconds used so far by the postmaster and its children (the backends)."""
    postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # (gone meanwhile)
        if int(pid) == postmaster or int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def turns(url: str, root: Path, n: int, conc: int) -> str:
    """One measurement in this process; its line of results."""
    from nanobot.storage.postgres import PgStorage
    from nanobot.storage.sessions import SessionStore
    from nanobot.storage_config import StorageConfig

    storage = await PgStorage.open(StorageConfig(url=url))
    store = SessionStore(storage.sessions, storage.leases)
    numbers = itertools.count()

    async def worker() -> None:
        while (i := next(numbers)) < n:
            key = f"api:bench-{i}"
            async with store.lock(key):
                await store.history(key)
                await store.append_turn(key, TURN)

    server, mine, start = server_cpu(root), own_cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    seconds = time.perf_counter() - start
    server, mine = server_cpu(root) - server, own_cpu() - mine
    await storage.close()
    return (
        f"c={conc}: {n / seconds:,.0f} turns/s; PostgreSQL {1e6 * server / n:.0f} µs CPU/turn; "
        f"gateway side {1e6 * mine / n:.0f} µs CPU/turn"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_turns", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8000, help="turns per concurrency")
    parser.add_argument("--conc", default="1,16", help="concurrencies, comma-separated")
    parser.add_argument("--child", nargs=2, metavar=("URL", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(asyncio.run(turns(args.child[0], Path(args.child[1]), args.n, int(args.conc))), flush=True)
        return
    pg = _pgserver()
    why = pg.missing()
    if why is not None:
        sys.exit(f"no PostgreSQL to measure: {why}")
    server = pg.start_server()
    try:
        for i, conc in enumerate(int(c) for c in args.conc.split(",")):
            url = pg.create_database(server, f"turns_{os.getpid()}_{i}")
            child = [sys.executable, "-m", "bench.pg_turns", "--n", str(args.n), "--conc", str(conc)]
            subprocess.run([*child, "--child", url, str(server.root)], cwd=ROOT, check=True)
    finally:
        pg.stop_server(server)


if __name__ == "__main__":
    main()
