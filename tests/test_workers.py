"""`nanobot serve --workers N`: N processes on one port, kept running by a supervisor."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from cluster import alive, ask, serving_workers, start, wait_gone, write_config
from served import free_port

from fake_llm import FakeLLM


def test_several_workers_on_sqlite_are_refused_in_one_line(tmp_path: Path) -> None:
    """`--workers 2` without PostgreSQL exits 2 with one line saying why and what to set."""
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", free_port())
    for how in (["--workers", "2"], []):
        if not how:  # the same from config.json
            data = orjson.loads(config.read_bytes())
            data["api"]["workers"] = 3
            config.write_bytes(orjson.dumps(data))
        proc = subprocess.run(
            [sys.executable, "-m", "nanobot", "serve", "-c", str(config), *how],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "SQLite" in lines[0] and "storage.url = postgresql://" in lines[0]
        assert ("--workers 2" if how else "api.workers = 3") in lines[0]


def test_workers_that_cannot_reach_the_database_end_the_supervisor_with_exit_2(tmp_path: Path) -> None:
    """When the workers cannot start (database down), `serve --workers` exits 2, password unsaid."""
    dead = free_port()
    url = f"postgresql://bot:Unused-Secret-9@127.0.0.1:{dead}/nanobot"
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", free_port(), storage={"connectTimeout": 3})
    proc = subprocess.run(
        [sys.executable, "-m", "nanobot", "serve", "-c", str(config), "--workers", "2", "--storage-url", url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"127.0.0.1:{dead}/nanobot" in proc.stderr and "Unused-Secret" not in proc.stderr


def test_a_taken_port_is_one_line_and_no_worker_starts(tmp_path: Path, pg_url: str) -> None:
    """`serve --workers` on a port another server holds says so at once (it never joins that port)."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(tmp_path, "http://127.0.0.1:9/v1", port, storage={"url": pg_url})
        proc = subprocess.run(
            [sys.executable, "-m", "nanobot", "serve", "-c", str(config), "--workers", "2"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines == [
        f"nanobot: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


@pytest.mark.timeout(180)
async def test_workers_share_one_port_and_a_killed_worker_is_replaced(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """Three workers answer on one port; one killed with -9 is restarted; SIGTERM stops them all."""
    async with serving_workers(tmp_path, fake_llm.url, pg_url, 3) as (served, pids):  # type: ignore[attr-defined]
        assert len(set(pids)) == 3 and served.proc.pid not in pids
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            answers = await asyncio.gather(*(ask(http, served.url, f"s{i}", f"hi {i}") for i in range(12)))
            assert answers == [f"echo: hi {i}" for i in range(12)]
            os.kill(pids[1], signal.SIGKILL)
            line = await served.wait_log("restarting it in", within=30)
            assert f"worker 2 (pid {pids[1]}) was killed by SIGKILL; restarting it in 1 s" in line
            restarted = await served.wait_log("worker 2 restarted", within=90)
            new_pid = int(re.search(r"pid (\d+)", restarted).group(1))  # type: ignore[union-attr]
            assert new_pid not in pids and alive(new_pid)
            # Every session, whichever worker ran it, continues on any of them.
            answers = await asyncio.gather(*(ask(http, served.url, f"s{i}", f"again {i}") for i in range(12)))
            assert answers == [f"echo: again {i}" for i in range(12)]
        histories = [[m["content"] for m in r["messages"] if m["role"] == "user"] for r in fake_llm.requests]
        again = sorted(h for h in histories if h[-1].startswith("again "))
        assert again == sorted([f"hi {i}", f"again {i}"] for i in range(12))  # each with its first turn
        served.terminate()
        assert await served.exit_code(within=60) == 0, served.log
        await wait_gone([pids[0], new_pid, pids[2]])
        assert "Traceback" not in served.log


@pytest.mark.timeout(120)
async def test_workers_stop_when_their_supervisor_is_killed(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """kill -9 of the supervisor leaves no worker behind holding the port."""
    async with serving_workers(tmp_path, fake_llm.url, pg_url, 2) as (served, pids):  # type: ignore[attr-defined]
        try:
            served.proc.kill()
            await served.proc.wait()
            await wait_gone(pids)
        finally:  # (no worker left behind if it failed)
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


async def test_storage_url_flag_overrides_the_config_and_is_never_printed(
    tmp_path: Path, pg_url: str
) -> None:
    """`--storage-url` replaces storage.url; start-up names the database without its password."""
    port = free_port()
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", port, storage={"url": "sqlite"})
    served = await start(config, port, "--storage-url", pg_url)
    try:
        line = await served.wait_log("storage: postgresql://", within=60)
        assert "storage: postgresql://127.0.0.1:" in line
        served.terminate()
        assert await served.exit_code(within=30) == 0, served.log
        assert "pg-Secret" not in served.log
    finally:
        if served.proc.returncode is None:
            served.proc.kill()
            await served.proc.wait()


def _sample(exposition: str, series: str) -> float | None:
    """The value of one series in a Prometheus text exposition (None: not there)."""
    for line in exposition.splitlines():
        key, _, value = line.rpartition(" ")
        if key == series:
            return float(value)
    return None


async def test_metrics_on_the_shared_port_count_every_worker(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """A scrape lands on one worker at random, and still counts the requests every worker
    answered: the worker adds up its siblings' numbers (read over their private sockets)."""
    async with serving_workers(tmp_path, fake_llm.url, pg_url, 2) as (served, pids):  # type: ignore[attr-defined]
        route = 'method="POST",route="/v1/chat/completions"'
        chats = f'nanobot_http_requests_total{{{route},status="200"}}'
        # (a new connection each: the kernel spreads them over both workers)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            answers = await asyncio.gather(*(ask(http, served.url, f"m{i}", f"hi {i}") for i in range(20)))
            assert answers == [f"echo: hi {i}" for i in range(20)]
            for _ in range(6):  # (several scrapes: whichever worker answers)
                async with http.get(f"{served.url}/metrics") as r:
                    assert r.status == 200
                    text = await r.text()
                assert _sample(text, chats) == 20
                assert _sample(text, "nanobot_workers_answering") == 2
                assert _sample(text, "nanobot_ready") == 1
                assert _sample(text, f"nanobot_http_request_duration_seconds_count{{{route}}}") == 20
            folder = next(Path(p) for p in re.findall(r"--workers-dir (\S+)", _cmdlines(pids)))
            assert oct(folder.stat().st_mode & 0o777) == "0o700"
        served.terminate()
        assert await served.exit_code(within=60) == 0, served.log
        assert not folder.exists()  # (the supervisor removes it)
        assert "Traceback" not in served.log


def _cmdlines(pids: list[int]) -> str:
    return " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in pids)
