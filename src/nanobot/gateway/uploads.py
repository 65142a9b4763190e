"""Turn a request's files into model input: image parts, and document text appended to the message."""

from __future__ import annotations

import asyncio

from nanobot.attachments import AttachmentLimits, PreparedFile, decode_data_url, prepare_file
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
    prepared = await _prepare_all(chat, limits) if (chat.files or chat.parts) else []
    if not prepared:
        return InboundMessage(
            "api",
            chat.session_id,
            chat.text,
            request_id=request_id,
            stream=chat.stream,
            instructions=chat.instructions,
        )
    blocks = [p.model_block() for p in prepared if p.image is None]
    placeholders = [p.history_text() for p in prepared]
    content = "\n\n".join(s for s in (chat.text, *blocks) if s)
    history = "\n\n".join(s for s in (chat.text, *placeholders) if s)
    return InboundMessage(
        "api",
        chat.session_id,
        content,
        request_id=request_id,
        stream=chat.stream,
        images=tuple(p.image for p in prepared if p.image is not None),
        instructions=chat.instructions,
        history_content=history,
    )
