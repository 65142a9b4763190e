"""Opening the connection to one MCP server: a child process over stdio, or Streamable HTTP.

A stdio server must not outlive the gateway, even one killed with ``kill -9`` (nothing of
ours runs then). On Linux the child is started through a few lines of Python that ask
the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``), then ``exec`` the real
command: the server keeps its pid, its pipes and its process group, so the SDK's own
shutdown (close stdin, wait, terminate the group) works unchanged. The launcher checks
that its parent is still the gateway after setting it, closing the race with a parent
that died before the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator
from typing import TextIO

import httpx2
from mcp.client._transport import TransportStreams
from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client
from mcp.client.streamable_http import streamable_http_client

from nanobot.config import safe_url
from nanobot.errors import NanobotError
from nanobot.tools_config import McpServerConfig

# httpx2 logs every request at INFO with its full URL (a query may hold a key): one line per
# tool call is noise, and the URL must not reach the log. Its warnings still do.
logging.getLogger("httpx2").setLevel(logging.WARNING)
HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)  # the SDK's defaults: a response stream may idle long

# argv: [parent pid, program, *args]. PR_SET_PDEATHSIG is 1 (linux/prctl.h).
_LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
try:
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as exc:
    print(f"cannot run {sys.argv[2]}: {exc.strerror}", file=sys.stderr)
    sys.exit(127)
"""


class McpStartError(NanobotError):
    """A server that cannot even be started (its command is not found)."""


def describe_target(config: McpServerConfig) -> str:
    """What the server is, for log lines: its command, or its URL without secrets."""
    return config.command if config.is_stdio else safe_url(config.url)


@contextlib.asynccontextmanager
async def open_transport(config: McpServerConfig) -> AsyncIterator[TransportStreams]:
    """The SDK's read/write streams to the server ``config`` names (its process or its URL)."""
    if config.is_stdio:
        params = await asyncio.to_thread(_stdio_params, config)
        async with stdio_client(params, errlog=_errlog()) as streams:
            yield streams
        return
    async with (
        httpx2.AsyncClient(headers=config.headers, timeout=HTTP_TIMEOUT) as client,
        streamable_http_client(config.url, http_client=client) as streams,
    ):
        yield streams


def _stdio_params(config: McpServerConfig) -> StdioServerParameters:
    """How to spawn the server: its command found on its own ``PATH``, behind the launcher on Linux."""
    env = get_default_environment() | config.env
    cwd = os.path.expanduser(config.cwd) if config.cwd else None
    program = os.path.expanduser(config.command)
    if os.sep in program and not os.path.isabs(program) and cwd:
        program = os.path.join(cwd, program)
    found = shutil.which(program, path=env.get("PATH"))
    if found is None:
        raise McpStartError(f"command not found: {config.command}")
    if cwd is not None and not os.path.isdir(cwd):
        raise McpStartError(f"cwd is not a directory: {config.cwd}")
    if sys.platform != "linux":  # no PR_SET_PDEATHSIG: the SDK's shutdown is all there is
        return StdioServerParameters(command=found, args=list(config.args), env=env, cwd=cwd)
    launcher = ["-I", "-S", "-c", _LAUNCHER, str(os.getpid()), os.path.abspath(found), *config.args]
    return StdioServerParameters(command=sys.executable, args=launcher, env=env, cwd=cwd)


def _errlog() -> TextIO:
    """Where a server's stderr goes: ours (the real one, which has a file descriptor)."""
    return sys.__stderr__ or sys.stderr
