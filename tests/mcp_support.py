"""Helpers for the MCP tests: the demo server's config, an HTTP demo server, and waiting on log lines."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

DEMO = str(Path(__file__).with_name("mcp_demo.py"))
MCP_LOGGER = "nanobot.tools.mcp"


def stdio_server(*options: str, **settings: Any) -> dict[str, Any]:
    """A ``tools.mcpServers`` entry running the demo server over stdio with these options."""
    return {"command": sys.executable, "args": [DEMO, "stdio", *options], **settings}


class LogWatch(logging.Handler):
    """Keeps the records of one logger and wakes waiters when a new one arrives."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        """Keep ``record``; runs on the loop's thread (the MCP code logs from its tasks)."""
        self.records.append(record)
        self._changed.set()

    @property
    def lines(self) -> list[str]:
        """Every message so far."""
        return [r.getMessage() for r in self.records]

    def count(self, text: str) -> int:
        """How many messages contain ``text``."""
        return sum(text in line for line in self.lines)

    async def wait_for(self, text: str, times: int = 1, within: float = 30) -> None:
        """Wait until ``times`` messages contain ``text`` (failing after ``within`` seconds)."""
        async with asyncio.timeout(within):
            while self.count(text) < times:
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def watch_mcp_log() -> AsyncIterator[LogWatch]:
    """A :class:`LogWatch` on the MCP logger while inside."""
    watch = LogWatch()
    logger = logging.getLogger(MCP_LOGGER)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(old_level)


@asynccontextmanager
async def http_server(name: str = "web") -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """The demo server over Streamable HTTP on 127.0.0.1: its ``/mcp`` URL and its process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, DEMO, "http", "--name", name, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        port = int(line.split()[1])
        yield f"http://127.0.0.1:{port}/mcp", proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
