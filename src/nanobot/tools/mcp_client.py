"""One MCP server's connection, through the official SDK (imported only when servers are configured).

:class:`McpServer` has one long-lived task (:meth:`McpServer.run`) that owns the connection:
the SDK's transports and session are anyio context managers, which must be entered and
left in the same task. That task connects, lists the tools, then waits until the server is
lost (its stdio pipe closes, its HTTP transport fails, or a call finds the connection
closed), says its tools changed, or shutdown is asked for; a lost server is reconnected
with the one backoff policy (:class:`~nanobot.delivery.lifecycle.RetryPolicy`). Calls do not
go through that task: the SDK's session correlates concurrent requests itself, so a tool
call runs in the turn's own task, and cancelling the turn cancels the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import anyio
import mcp.types as mcp_types
import pydantic
from mcp import ClientSession
from mcp.client._transport import ReadStream
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from nanobot import __version__
from nanobot.delivery.lifecycle import RetryPolicy
from nanobot.errors import NanobotError
from nanobot.redact import redact
from nanobot.tools.base import ToolResult
from nanobot.tools.mcp_result import convert
from nanobot.tools.mcp_schema import Listed, describe, normalize_schema
from nanobot.tools.mcp_transport import describe_target, open_transport
from nanobot.tools_config import McpServerConfig

log = logging.getLogger("nanobot.tools.mcp")  # one logger for everything MCP

START_TIMEOUT = 60.0  # seconds for the handshake and tool listing (npx/uvx may download first)
STABLE_SECONDS = 60.0  # a server that stayed up this long starts its backoff from the beginning
CALL_GRACE = 5.0  # past a call's own timeout, a backstop for a write the server never reads
MAX_LIST_PAGES = 20  # of tools/list: a server that pages forever still comes up
_CLIENT = mcp_types.Implementation(name="nanobot", version=__version__)


class McpServer:
    """One configured server: its connection task, its tools while it is up, and its calls."""

    def __init__(
        self, name: str, config: McpServerConfig, policy: RetryPolicy, on_change: Callable[[], None]
    ) -> None:
        self.name = name
        self.config = config
        self._policy = policy
        self._on_change = on_change  # called (no arguments) when the listing appears or goes
        self._session: ClientSession | None = None
        self.listing: tuple[Listed, ...] = ()  # empty while down
        self._stopped = asyncio.Event()  # stop() was called
        self._wake = asyncio.Event()  # the current connection needs attention: see the flags below
        self._lost = False  # the current connection is gone
        self._relist = False  # the server said its tools changed
        self._starting: anyio.CancelScope | None = None  # the handshake, which stop() cuts short

    def stop(self) -> None:
        """Ask :meth:`run` to close the connection and return."""
        self._stopped.set()
        self._wake.set()
        if self._starting is not None:
            self._starting.cancel()

    async def run(self) -> None:
        """Connect, stay connected, reconnect with backoff after a failure, until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        attempts = 0
        while not self._stopped.is_set():
            began = loop.time()
            reason, was_up = await self._connect_once()
            if self._stopped.is_set():
                return
            attempts = 1 if was_up and loop.time() - began >= STABLE_SECONDS else attempts + 1
            wait = self._policy.delay(attempts, None)
            if self.config.url:  # an HTTP error quotes the URL, whose query may hold a key
                reason = reason.replace(self.config.url, describe_target(self.config))
            log.warning("MCP server %s %s; retrying in %.1fs", self.name, reason, wait)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stopped.wait()

    async def _connect_once(self) -> tuple[str, bool]:
        """One connection, from start to loss: why it ended, and whether it was ever up."""
        self._wake, self._lost, self._relist = asyncio.Event(), False, False
        if self._stopped.is_set():
            return "stopped", False
        up = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(open_transport(self.config))
                read = await _watch(stack, read, self._mark_lost)
                session = await stack.enter_async_context(
                    ClientSession(read, write, client_info=_CLIENT, message_handler=self._on_message)
                )
                with anyio.CancelScope() as self._starting, anyio.fail_after(START_TIMEOUT):
                    await session.initialize()
                    listing = await _list_tools(session, self.name)
                self._starting = None
                if self._stopped.is_set():
                    return "stopped", False
                self._go_up(session, listing)
                up = True
                try:
                    await self._serve(session)
                finally:
                    self._go_down()
            return "closed its connection" + (" (it exited)" if self.config.is_stdio else ""), up
        except Exception as exc:  # any failure of the server or its transport: one line, then retry
            log.debug("MCP server %s failed", self.name, exc_info=True)  # the whole story, with -v
            return ("stopped working: " if up else "cannot start: ") + _cause(exc), up
        finally:
            self._starting = None

    async def _serve(self, session: ClientSession) -> None:
        """Hold the connection until it is lost or stop() is called; re-list the tools when told."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stopped.is_set() or self._lost:
                return
            if self._relist:
                self._relist = False
                with anyio.fail_after(START_TIMEOUT):
                    self.listing = await _list_tools(session, self.name)
                log.info("MCP server %s changed its tools: %d tools", self.name, len(self.listing))
                self._on_change()

    async def _on_message(self, message: mcp_types.ServerNotification | Exception) -> None:
        """The session's notifications: a changed tool list is listed again (by :meth:`_serve`)."""
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self._relist = True
            self._wake.set()

    def _mark_lost(self) -> None:
        self._lost = True
        self._wake.set()

    def _go_up(self, session: ClientSession, listing: tuple[Listed, ...]) -> None:
        self._session = session
        self.listing = listing
        log.info("MCP server %s is up (%s): %d tools", self.name, describe_target(self.config), len(listing))
        self._on_change()

    def _go_down(self) -> None:
        self._session = None
        self.listing = ()
        self._on_change()

    async def call(self, remote: str, args: dict[str, Any]) -> ToolResult:
        """Run ``remote`` on this server; every failure is an error result for the model."""
        session = self._session
        if session is None:
            return _error(f"MCP server {self.name} is not available right now; try again later")
        timeout = self.config.tool_timeout
        try:
            async with asyncio.timeout(timeout + CALL_GRACE):
                result = await session.call_tool(remote, args, read_timeout_seconds=timeout)
        except (TimeoutError, MCPError) as exc:
            if isinstance(exc, TimeoutError) or exc.code == mcp_types.REQUEST_TIMEOUT:
                return _error(f"{remote} on MCP server {self.name} timed out after {timeout:g}s")
            if exc.code != mcp_types.CONNECTION_CLOSED:
                return _error(f"{remote} on MCP server {self.name} failed: {redact(_one_line(exc.message))}")
            self._closed_under(session)
            return _error(f"MCP server {self.name} stopped during the call; it is being restarted")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._closed_under(session)
            return _error(f"MCP server {self.name} stopped during the call; it is being restarted")
        except (pydantic.ValidationError, RuntimeError) as exc:  # a malformed or unexpected answer
            return _error(
                f"{remote} on MCP server {self.name} gave an answer nanobot cannot read: {_cause(exc)}"
            )
        return convert(result, self.name, remote)

    def _closed_under(self, session: ClientSession) -> None:
        """A call found ``session`` closed: reconnect (unless that already happened)."""
        if self._session is session:
            self._mark_lost()


async def _watch(
    stack: contextlib.AsyncExitStack, read: ReadStream[Any], lost: Callable[[], None]
) -> ReadStream[Any]:
    """Pass ``read`` on through a stream of our own, calling ``lost`` when the server's end closes.

    The SDK's session notices a closed stream only by failing the requests waiting on it;
    this is how an idle server that exits is noticed at once.
    """
    send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    group = await stack.enter_async_context(anyio.create_task_group())
    stack.callback(group.cancel_scope.cancel)  # leaving: stop passing on before the transport closes

    async def pump() -> None:
        try:
            async with send:
                async for item in read:
                    await send.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the session is closing: nothing left to pass on
        lost()

    group.start_soon(pump)
    return receive


async def _list_tools(session: ClientSession, server: str) -> tuple[Listed, ...]:
    """Every tool the server lists (following pages), normalised for the model."""
    found: list[Listed] = []
    cursor: str | None = None
    for _ in range(MAX_LIST_PAGES):
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        for tool in page.tools:
            found.append(
                Listed(
                    tool.name,
                    describe(tool.description, server, tool.name),
                    normalize_schema(tool.input_schema),
                )
            )
        cursor = page.next_cursor
        if not cursor:
            break
    return tuple(found)


def _error(text: str) -> ToolResult:
    return ToolResult(f"Error: {text}", is_error=True)


def _cause(exc: BaseException) -> str:
    """One line saying what went wrong: the innermost real error of an exception group."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    if isinstance(exc, NanobotError):
        return exc.message
    if isinstance(exc, MCPError):
        text = exc.message
    elif isinstance(exc, TimeoutError):
        text = f"no answer within {START_TIMEOUT:g}s"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return _one_line(text)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
