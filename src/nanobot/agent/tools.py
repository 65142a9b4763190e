"""The tool registry, and the ``message`` tool every agent has."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from nanobot.bus import DeliveryReceipt, MessageBus, OutboundKind, OutboundMessage
from nanobot.providers.base import ToolCall


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Where the turn that runs a tool came from."""

    bus: MessageBus
    channel: str
    chat_id: str
    request_id: str


class Tool(ABC):
    """A function the model may call. ``execute`` returns the text the model sees."""

    name: ClassVar[str]
    description: ClassVar[str]
    parameters: ClassVar[dict[str, Any]]

    @abstractmethod
    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> str:
        """Run the tool with validated ``args``."""

    def definition(self) -> dict[str, Any]:
        """The OpenAI ``tools[]`` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class ToolRegistry:
    """The tools the model is offered, by name."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self._tools: dict[str, Tool] = {}
        self._definitions: tuple[dict[str, Any], ...] = ()
        for tool in tools or ():
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add (or replace) a tool."""
        self._tools[tool.name] = tool
        self._definitions = tuple(t.definition() for t in self._tools.values())

    @property
    def definitions(self) -> tuple[dict[str, Any], ...]:
        """Every tool's definition, computed once per registration."""
        return self._definitions

    async def execute(self, call: ToolCall, ctx: ToolContext) -> str:
        """Run one tool call; a bad call becomes an error text for the model, never an exception."""
        tool = self._tools.get(call.name)
        if tool is None:
            return f"Error: unknown tool {call.name!r}"
        try:
            args = orjson.loads(call.arguments or "{}")
        except orjson.JSONDecodeError:
            return f"Error: arguments for {call.name} are not valid JSON"
        if not isinstance(args, dict):
            return f"Error: arguments for {call.name} must be a JSON object"
        missing = [k for k in tool.parameters.get("required", ()) if k not in args]
        if missing:
            return f"Error: missing required argument(s) for {call.name}: {', '.join(missing)}"
        return await tool.execute(args, ctx)


class MessageTool(Tool):
    """Send a message to a chat: the current one by default, or an explicit channel and chat."""

    name = "message"
    description = (
        "Send a message to the user. Without `channel`/`chat_id` it goes to the current chat. "
        "With an explicit `channel` (e.g. telegram, discord) and `chat_id` it is delivered there."
    )
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "content": {"type": "string", "description": "The message text."},
            "channel": {"type": "string", "description": "Target channel, e.g. telegram or discord."},
            "chat_id": {"type": "string", "description": "Target chat id on that channel."},
        },
        "required": ["content"],
    }

    def __init__(self, receipt_timeout: float = 30.0) -> None:
        self._receipt_timeout = receipt_timeout

    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> str:
        """Publish the message and report what its first delivery attempt did."""
        content = args.get("content")
        if not isinstance(content, str) or not content.strip():
            return "Error: content must be a non-empty string"
        channel = str(args.get("channel") or ctx.channel).strip()
        chat_id = args.get("chat_id")
        if chat_id is None or chat_id == "":
            if channel != ctx.channel:
                return f"Error: chat_id is required to send to channel {channel}"
            chat_id = ctx.chat_id
        chat_id = str(chat_id)
        current = channel == ctx.channel and chat_id == ctx.chat_id
        receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
        ctx.bus.publish_outbound(
            OutboundMessage(
                channel=channel,
                chat_id=chat_id,
                content=content,
                kind=OutboundKind.MESSAGE,
                reply_to=ctx.request_id if current else "",
                receipt=receipt,
            )
        )
        try:
            async with asyncio.timeout(self._receipt_timeout):
                return str(await receipt)
        except TimeoutError:
            return "queued: delivery is still pending"
