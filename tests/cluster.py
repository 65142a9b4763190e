"""Helpers for tests with several real `nanobot serve` processes: configs, start, ask, wait."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from served import Served, free_port


def write_config(
    tmp_path: Path, llm_url: str, port: int, workspace: Path | None = None, **sections: Any
) -> Path:
    """``tmp_path/config.json`` for a server on ``port`` calling ``llm_url``, with its workspace
    (default ``tmp_path/ws``) and more top-level ``sections``."""
    workspace = workspace or tmp_path / "ws"
    config = {
        "api": {"port": port, **sections.pop("api", {})},
        "agents": {"defaults": {"model": "m", "provider": "fake", "workspace": str(workspace)}},
        "providers": {"fake": {"apiBase": llm_url, "retryBaseSeconds": 0.001}},
        **sections,
    }
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps(config))
    return path


async def start(config: Path, port: int, *args: str) -> Served:
    """``nanobot serve -c config ARGS`` (listening on ``port``) as a subprocess, its log read as it comes."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanobot", "serve", "-c", str(config), *args,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    return Served(proc, port)


@contextlib.asynccontextmanager
async def serving_workers(
    tmp_path: Path, llm_url: str, pg_url: str, count: int
) -> AsyncIterator[tuple[Served, list[int]]]:
    """``nanobot serve --workers count`` on ``pg_url``, once every worker is ready: the supervisor
    and the workers' pids. Killed at the end if a test left it running."""
    port = free_port()
    config = write_config(tmp_path, llm_url, port, storage={"url": pg_url})
    served = await start(config, port, "--workers", str(count))
    try:
        yield served, worker_pids(await served.wait_log("workers ready", within=90))
    finally:
        if served.proc.returncode is None:
            served.proc.kill()
            await served.proc.wait()


def worker_pids(line: str) -> list[int]:
    """The pids in the supervisor's "N workers ready (pids ...)" line."""
    found = re.search(r"workers ready \(pids ([\d, ]+)\)", line)
    assert found is not None, line
    return [int(p) for p in found.group(1).split(", ")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_gone(pids: list[int], within: float = 30) -> None:
    """Poll (with a deadline) until none of ``pids`` runs."""
    async with asyncio.timeout(within):
        while any(alive(p) for p in pids):  # noqa: ASYNC110 (other processes' exit, with a deadline)
            await asyncio.sleep(0.05)


async def ask(http: aiohttp.ClientSession, url: str, session_id: str, text: str) -> str:
    body = {"messages": [{"role": "user", "content": text}], "session_id": session_id}
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        answer: str = (await r.json())["choices"][0]["message"]["content"]
        return answer


async def wait_ready(url: str, within: float = 60) -> None:
    """Poll ``GET /health/ready`` (with a deadline) until it answers 200."""
    async with asyncio.timeout(within), aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/health/ready") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)  # a starting process, polled with a deadline
