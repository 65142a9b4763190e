"""Turn a request's files into model input: image parts, and document text appended to the message."""

from __future__ import annotations

import asyncio

from nanobot.attachments import (
    AttachmentLimits,
    PreparedFile,
    compose_user_input,
    decode_data_url,
    prepare_file,
)
from nanobot.bus import InboundMessage
from nanobot.gateway.requests import ChatRequest, FileInput


async def _prepare_all(chat: ChatRequest, limits: AttachmentLimits) -> list[PreparedFile]:
    inputs = list(chat.files)
    for part in chat.parts:
        _mime, data = decode_data_url(part.url, param=part.param, max_bytes=limits.max_file_bytes)
        inputs.append(FileInput(part.name, data, part.param))
    if not inputs:
        return []
    return list(await asyncio.gather(*(prepare_file(f.name, f.data, limits) for f in inputs)))


async def build_inbound(chat: ChatRequest, request_id: str, limits: AttachmentLimits) -> InboundMessage:
    """The :class:`InboundMessage` for an API request, its files sniffed, bounded and extracted."""
    if not (chat.files or chat.parts):
        return InboundMessage(
            "api",
            chat.session_id,
            chat.text,
            request_id=request_id,
            stream=chat.stream,
            instructions=chat.instructions,
        )
    user = compose_user_input(chat.text, await _prepare_all(chat, limits))
    return InboundMessage(
        "api",
        chat.session_id,
        user.content,
        request_id=request_id,
        stream=chat.stream,
        images=user.images,
        instructions=chat.instructions,
        history_content=user.history,
    )
