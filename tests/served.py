"""A real `nanobot serve` subprocess for tests: its URL, its log lines as they come, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

# Runs `nanobot serve` with a lower soft limit on open files (argv[1]), then the CLI arguments.
_WITH_FILE_LIMIT = (
    "import resource, sys; from nanobot.cli import main\n"
    "_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """One running gateway process."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode("utf-8", "replace"))
            self._new_line.set()

    async def wait_log(self, text: str, within: float = 15) -> str:
        """The first log line containing ``text`` (waiting for it up to ``within`` seconds)."""
        async with asyncio.timeout(within):
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                self._new_line.clear()
                await self._new_line.wait()

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.proc.send_signal(signal.SIGTERM)

    async def exit_code(self, within: float = 15) -> int:
        """Wait for the process to exit."""
        code = await asyncio.wait_for(self.proc.wait(), within)
        await self._reader
        return code

    @property
    def log(self) -> str:
        """Everything logged so far."""
        return "".join(self.lines)


@asynccontextmanager
async def serve(
    tmp_path: Path,
    llm_url: str,
    api: dict[str, Any],
    *,
    file_limit: int | None = None,
    extra: dict[str, Any] | None = None,
) -> AsyncIterator[Served]:
    """Start `nanobot serve` against ``llm_url`` with these ``api`` settings (and ``extra``
    top-level sections, e.g. ``tools``); killed on exit."""
    port = free_port()
    path = tmp_path / "config.json"
    config = {
        "api": {"port": port, **api},
        "agents": {"defaults": {"model": "m", "provider": "fake", "workspace": str(tmp_path / "ws")}},
        "providers": {"fake": {"apiBase": llm_url, "retryBaseSeconds": 0.001}},
        **(extra or {}),
    }
    path.write_bytes(orjson.dumps(config))
    args = ["serve", "-c", str(path)]
    prefix = ["-m", "nanobot"] if file_limit is None else ["-c", _WITH_FILE_LIMIT, str(file_limit)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *prefix,
        *args,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    served = Served(proc, port)
    try:
        await _wait_listening(served)
        yield served
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await served._reader


async def _wait_listening(served: Served) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(f"{served.url}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline or served.proc.returncode is not None:
                    raise AssertionError(f"nanobot serve did not start:\n{served.log}") from None
                await asyncio.sleep(0.05)  # polling a starting process with a deadline
