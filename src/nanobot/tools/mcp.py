"""MCP servers as a source of tools: started in the background, kept alive, offered while up.

:class:`McpServers` is the registry's :class:`~nanobot.tools.base.ToolSource` for every
configured server; each server's connection is a :class:`~nanobot.tools.mcp_client.McpServer`.
While a server is down its tools are not offered, and each failure is one log line; the
server's own stderr is passed through to ours. The SDK takes about a second to import, so it
is imported in a thread once the gateway is up, and only when a server is configured:
``/health`` and start-up never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nanobot.delivery.lifecycle import RetryPolicy
from nanobot.tools.base import Tool, ToolContext, ToolResult
from nanobot.tools.mcp_schema import Listed, tool_names
from nanobot.tools_config import McpServerConfig

if TYPE_CHECKING:
    from nanobot.tools.mcp_client import McpServer

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # seconds all servers get to close; the SDK bounds each stdio stop to ~6 s


class McpTool(Tool):
    """One MCP server's tool, offered to the model as ``mcp_<server>_<tool>``."""

    def __init__(self, server: McpServer, name: str, listed: Listed) -> None:
        self.name = name
        self.description = listed.description
        self.parameters = listed.parameters
        self._server = server
        self._remote = listed.remote

    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Call the tool on its server, within the server's ``toolTimeout``."""
        return await self._server.call(self._remote, args)


class McpServers:
    """Every configured MCP server, as one :class:`~nanobot.tools.base.ToolSource`."""

    def __init__(self, configs: Mapping[str, McpServerConfig], policy: RetryPolicy) -> None:
        self._configs = dict(configs)
        self._policy = policy
        self._servers: list[McpServer] = []  # once the SDK is imported
        self._tools: tuple[McpTool, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def tools(self) -> Sequence[Tool]:
        """The tools of the servers that are up now (the same objects until one comes or goes)."""
        return self._tools

    def _rebuild(self) -> None:
        """Name every up server's tools (in config order, so names are stable) and keep the enabled."""
        taken: set[str] = set()
        tools = []
        for server in self._servers:
            listing = server.listing
            names = tool_names(server.name, (t.remote for t in listing), taken)
            enabled = server.config.enabled_tools
            for name, listed in zip(names, listing, strict=True):
                if "*" in enabled or listed.remote in enabled or name in enabled:
                    tools.append(McpTool(server, name, listed))
        self._tools = tuple(tools)

    def start(self) -> None:
        """Start every server in the background: nothing waits for them."""
        if self._configs and self._task is None:
            self._task = asyncio.create_task(self._run(), name="nanobot-mcp")

    async def _run(self) -> None:
        try:
            server_class = await asyncio.to_thread(_import_client)
        except ImportError as exc:  # a broken install: say so once, serve everything else
            log.error("MCP servers are configured but the mcp package cannot be imported: %s", exc)
            return
        if self._closing:
            return
        self._servers = [server_class(n, c, self._policy, self._rebuild) for n, c in self._configs.items()]
        async with asyncio.TaskGroup() as group:
            for server in self._servers:
                group.create_task(server.run(), name=f"nanobot-mcp-{server.name}")

    async def close(self) -> None:
        """Close every server (a stdio server's process ends); bounded by ``STOP_TIMEOUT``."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        for server in self._servers:
            server.stop()
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        if not done:
            log.warning("MCP servers did not close within %.0fs; cancelling", STOP_TIMEOUT)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _import_client() -> type[McpServer]:
    from nanobot.tools.mcp_client import McpServer

    return McpServer
