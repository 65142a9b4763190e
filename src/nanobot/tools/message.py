"""The ``message`` tool every agent has: say something now, here or on another channel."""

from __future__ import annotations

import asyncio
from typing import Any

from nanobot.bus import DeliveryReceipt, OutboundKind, OutboundMessage
from nanobot.tools.base import Tool, ToolContext, ToolResult

_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "content": {"type": "string", "description": "The message text."},
        "channel": {"type": "string", "description": "Target channel, e.g. telegram or discord."},
        "chat_id": {"type": "string", "description": "Target chat id on that channel."},
    },
    "required": ["content"],
}


class MessageTool(Tool):
    """Send a message to a chat: the current one by default, or an explicit channel and chat."""

    name = "message"
    description = (
        "Send a message to the user. Without `channel`/`chat_id` it goes to the current chat. "
        "With an explicit `channel` (e.g. telegram, discord) and `chat_id` it is delivered there."
    )
    parameters = _PARAMETERS

    def __init__(self, receipt_timeout: float = 30.0) -> None:
        self._receipt_timeout = receipt_timeout

    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult | str:
        """Publish the message and report what its first delivery attempt did."""
        content = args.get("content")
        if not isinstance(content, str) or not content.strip():
            return ToolResult("Error: content must be a non-empty string", is_error=True)
        channel = str(args.get("channel") or ctx.channel).strip()
        chat_id = args.get("chat_id")
        if chat_id is None or chat_id == "":
            if channel != ctx.channel:
                return ToolResult(f"Error: chat_id is required to send to channel {channel}", is_error=True)
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
