"""The tool registry: which tools the model is offered on a channel, and running a call.

``definitions(channel)`` runs on every model call, so it is a dictionary lookup unless the
set of tools changed (an MCP server came or went): only then are the definitions rebuilt.
A call never raises into the turn: an unknown or disabled tool, bad arguments, or a tool
that fails become an error result for the model (``CancelledError`` passes through).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import orjson

from nanobot.bus import OutboundKind, OutboundMessage
from nanobot.errors import NanobotError
from nanobot.providers.base import ToolCall
from nanobot.tools.base import Tool, ToolContext, ToolResult, ToolSource, shorten
from nanobot.tools_config import ToolsConfig

log = logging.getLogger(__name__)


class ToolRegistry:
    """Static tools plus dynamic :class:`ToolSource` sets, filtered by ``tools.enabled`` per channel."""

    def __init__(
        self,
        tools: Sequence[Tool] = (),
        sources: Sequence[ToolSource] = (),
        config: ToolsConfig | None = None,
    ) -> None:
        config = config or ToolsConfig()
        self._static: dict[str, Tool] = {}
        self._sources: list[ToolSource] = list(sources)
        self._enabled = tuple(config.enabled)
        self._per_channel = {name: tuple(ch.enabled) for name, ch in config.channels.items()}
        self._max_chars = config.max_result_chars
        self._dynamic: tuple[Tool, ...] = ()  # the sources' tools when the caches were built
        self._by_name: dict[str, Tool] = {}
        self._definitions: dict[str, tuple[dict[str, Any], ...]] = {}  # per channel
        self._allowed: dict[str, frozenset[str]] = {}  # per channel: enabled tool names
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add (or replace) a static tool."""
        self._static[tool.name] = tool
        self._rebuild(self._dynamic)

    def add_source(self, source: ToolSource) -> None:
        """Add a dynamic set of tools (its tools are looked at on every turn)."""
        self._sources.append(source)
        self._rebuild(self._current())

    def _current(self) -> tuple[Tool, ...]:
        return tuple(t for source in self._sources for t in source.tools())

    def _refresh(self) -> None:
        """Rebuild the caches when a source's tools changed (compared by identity: cheap)."""
        if not self._sources:
            return
        now = self._current()
        old = self._dynamic
        if len(now) != len(old) or any(a is not b for a, b in zip(now, old, strict=True)):
            self._rebuild(now)

    def _rebuild(self, dynamic: tuple[Tool, ...]) -> None:
        by_name = dict(self._static)
        for tool in dynamic:
            if by_name.setdefault(tool.name, tool) is not tool:
                log.warning("tool %s is offered twice; the first one is used", tool.name)
        self._dynamic = dynamic
        self._by_name = by_name
        self._definitions = {}
        self._allowed = {}

    def _enabled_names(self, channel: str) -> frozenset[str]:
        allowed = self._allowed.get(channel)
        if allowed is None:
            patterns = self._per_channel.get(channel, self._enabled)
            allowed = frozenset(
                name for name in self._by_name if any(fnmatch.fnmatchcase(name, p) for p in patterns)
            )
            self._allowed[channel] = allowed
        return allowed

    def definitions(self, channel: str) -> tuple[dict[str, Any], ...]:
        """The ``tools[]`` the model is offered on ``channel``: available and enabled there."""
        self._refresh()
        cached = self._definitions.get(channel)
        if cached is None:
            allowed = self._enabled_names(channel)
            cached = tuple(t.definition() for name, t in self._by_name.items() if name in allowed)
            self._definitions[channel] = cached
        return cached

    def names(self, channel: str) -> list[str]:
        """The names of the tools offered on ``channel``, in order."""
        return [d["function"]["name"] for d in self.definitions(channel)]

    async def execute(self, call: ToolCall, ctx: ToolContext) -> ToolResult:
        """Run one call; every failure becomes an error result for the model. Publishes progress
        events (``OutboundKind.TOOL_PROGRESS``) for the request; only the ones that asked see them."""
        self._refresh()
        tool = self._by_name.get(call.name)
        if tool is None or call.name not in self._enabled_names(ctx.channel):
            unknown = _error(f"Error: unknown tool {call.name!r}")  # disabled ones are not named as such
            _progress(ctx, call, "failed", unknown.text)
            return unknown
        args = _parse_args(call, tool)
        if isinstance(args, ToolResult):
            _progress(ctx, call, "failed", args.text)
            return args
        _progress(ctx, call, "started", tool.summarize(args))
        try:
            raw = await tool.execute(args, ctx)
        except asyncio.CancelledError:
            raise
        except NanobotError as exc:
            raw = _error(f"Error: {call.name} failed: {exc.message}")
        except Exception as exc:  # a tool's bug must reach the model as an error, not end the turn
            log.exception("tool %s raised", call.name)
            raw = _error(f"Error: {call.name} failed: {type(exc).__name__}: {exc}")
        result = self._bounded(ToolResult(raw) if isinstance(raw, str) else raw)
        if result.is_error:
            _progress(ctx, call, "failed", result.text)
        else:
            _progress(ctx, call, "finished", tool.summarize(args))
        return result

    def _bounded(self, result: ToolResult) -> ToolResult:
        text = result.text
        limit = self._max_chars
        if len(text) <= limit:
            return result
        marker = (
            f"\n\n[truncated: the result has {len(text):,} characters; "
            f"only the first {limit:,} are shown (tools.maxResultChars)]"
        )
        return ToolResult(text[:limit] + marker, result.images, result.is_error)


def _error(text: str) -> ToolResult:
    return ToolResult(text, is_error=True)


def _parse_args(call: ToolCall, tool: Tool) -> dict[str, Any] | ToolResult:
    try:
        args = orjson.loads(call.arguments or "{}")
    except orjson.JSONDecodeError:
        return _error(f"Error: arguments for {call.name} are not valid JSON")
    if not isinstance(args, dict):
        return _error(f"Error: arguments for {call.name} must be a JSON object")
    missing = [k for k in tool.parameters.get("required", ()) if k not in args]
    if missing:
        return _error(f"Error: missing required argument(s) for {call.name}: {', '.join(missing)}")
    return args


def _progress(ctx: ToolContext, call: ToolCall, status: str, summary: str) -> None:
    event = {"tool": call.name, "status": status, "call_id": call.id, "summary": shorten(summary)}
    ctx.bus.publish_outbound(
        OutboundMessage(
            ctx.channel, ctx.chat_id, kind=OutboundKind.TOOL_PROGRESS, reply_to=ctx.request_id, metadata=event
        )
    )
