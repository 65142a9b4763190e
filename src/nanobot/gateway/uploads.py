"""Turn a request's files into model input: image parts, and document text appended to the message."""

from __future__ import annotations

import asyncio
from typing import Any

from nanobot.attachments import AttachmentLimits, PreparedFile, compose_user_input, prepare_file
from nanobot.bus import InboundKind, InboundMessage
from nanobot.gateway.requests import ChatRequest, FileInput


def inbound_message(
    chat: ChatRequest, request_id: str, history: tuple[dict[str, Any], ...] | None = None
) -> InboundMessage:
    """The :class:`InboundMessage` for an API request without files."""
    # Positional: a class called with keywords builds a dict of them (~450 instructions each).
    return InboundMessage(
        "api",
        chat.session_id,
        chat.text,
        "",  # sender_id
        request_id,
        InboundKind.MESSAGE,
        chat.stream,
        (),  # images
        chat.instructions,
        None,  # history_content: the same as content
        chat.temperature,
        chat.max_tokens,
        chat.use_tools,
        chat.response_format,
        {},  # metadata
        history,
    )


async def build_inbound(chat: ChatRequest, request_id: str, limits: AttachmentLimits) -> InboundMessage:
    """The :class:`InboundMessage` for an API request, its files sniffed, bounded and extracted."""
    history = None if chat.history is None else await _history(chat, limits)
    if not chat.files:
        return inbound_message(chat, request_id, history)
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
        history=history,
        use_tools=chat.use_tools,
        response_format=chat.response_format,
    )


async def _history(chat: ChatRequest, limits: AttachmentLimits) -> tuple[dict[str, Any], ...]:
    """A resent conversation as the model gets it: earlier users' files prepared like uploads
    (documents' text appended, images as vision parts), all at once."""
    assert chat.history is not None
    files: list[FileInput] = [f for past in chat.history for f in past.files]
    if not files:
        return tuple(past.message for past in chat.history)
    prepared = iter(await asyncio.gather(*(prepare_file(f.name, f.data, limits) for f in files)))
    out: list[dict[str, Any]] = []
    for past in chat.history:
        if not past.files:
            out.append(past.message)
            continue
        mine: list[PreparedFile] = [next(prepared) for _ in past.files]
        user = compose_user_input(past.message["content"], mine)
        content: object = user.content
        if user.images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": user.content}] if user.content else []
            parts.extend({"type": "image_url", "image_url": {"url": i.data_url}} for i in user.images)
            content = parts
        out.append({"role": "user", "content": content})
    return tuple(out)
