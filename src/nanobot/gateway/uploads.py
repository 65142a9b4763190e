"""Turn a request's files into model input: image parts, and document text appended to the message."""

from __future__ import annotations

import asyncio

from nanobot.attachments import AttachmentLimits, compose_user_input, prepare_file
from nanobot.bus import InboundMessage
from nanobot.gateway.requests import ChatRequest


async def build_inbound(chat: ChatRequest, request_id: str, limits: AttachmentLimits) -> InboundMessage:
    """The :class:`InboundMessage` for an API request, its files sniffed, bounded and extracted."""
    if not chat.files:
        return InboundMessage(
            "api",
            chat.session_id,
            chat.text,
            request_id=request_id,
            stream=chat.stream,
            instructions=chat.instructions,
            temperature=chat.temperature,
            max_tokens=chat.max_tokens,
            use_tools=chat.use_tools,
            response_format=chat.response_format,
        )
    prepared = await asyncio.gather(*(prepare_file(f.name, f.data, limits) for f in chat.files))
    user = compose_user_input(chat.text, prepared)
    return InboundMessage(
        "api",
        chat.session_id,
        user.content,
        request_id=request_id,
        stream=chat.stream,
        images=user.images,
        instructions=chat.instructions,
        history_content=user.history,
        temperature=chat.temperature,
        max_tokens=chat.max_tokens,
        use_tools=chat.use_tools,
        response_format=chat.response_format,
    )
