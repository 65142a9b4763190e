"""What a turn sends to the model: the user's message and the tools' images as the model sees
them and as the history keeps them, and the prompt whose oldest turns are dropped when it
outgrows the model's context."""

from __future__ import annotations

from typing import Any

from nanobot.bus import InboundMessage
from nanobot.errors import ContextLengthError
from nanobot.storage.sessions import ChatMessage, message_size
from nanobot.tools import ToolResult


def user_message(msg: InboundMessage) -> tuple[ChatMessage, ChatMessage]:
    """The user's message as the model sees it this turn, and as the history keeps it."""
    stored: ChatMessage = {"role": "user", "content": msg.history_content or msg.content}
    if not msg.images:
        return {"role": "user", "content": msg.content}, stored
    parts: list[dict[str, Any]] = [{"type": "text", "text": msg.content}] if msg.content else []
    parts.extend({"type": "image_url", "image_url": {"url": img.data_url}} for img in msg.images)
    return {"role": "user", "content": parts}, stored


def images_message(results: list[tuple[str, ToolResult]]) -> tuple[ChatMessage, ChatMessage]:
    """The tools' images as a user message for the model, and as the history keeps it (placeholders,
    like uploaded images: the pictures themselves are for this turn only)."""
    parts: list[dict[str, Any]] = []
    names: list[str] = []
    for tool, result in results:
        parts.append({"type": "text", "text": f"(images returned by the tool {tool})"})
        for image in result.images:
            parts.append({"type": "image_url", "image_url": {"url": image.data_url}})
            names.append(f"[image: {image.name or tool}]")
    return {"role": "user", "content": parts}, {"role": "user", "content": " ".join(names)}


def too_long(exc: ContextLengthError, had_history: bool) -> str:
    if had_history:
        return (
            "This conversation no longer fits the model's context, even with its oldest turns left out. "
            "Start a new conversation (send a new session_id), or lower max_tokens. "
            f"Upstream said: {exc.message}"
        )
    return (
        "This message does not fit the model's context: shorten it, send smaller or fewer files, "
        f"or lower max_tokens. Upstream said: {exc.message}"
    )


class Prompt:
    """What is sent to the model this turn; ``messages[history_start:history_end]`` is the history."""

    __slots__ = ("history_end", "history_start", "messages", "trimmed")

    def __init__(self, messages: list[ChatMessage], history_start: int, history_end: int) -> None:
        self.messages = messages
        self.history_start = history_start
        self.history_end = history_end
        self.trimmed = False

    def drop_oldest_turns(self) -> bool:
        """Drop the oldest turns (about half the history's text); False when there is none to drop."""
        start, end = self.history_start, self.history_end
        if start == end:
            return False
        kept = newest_turns(self.messages[start:end])
        self.messages[start:end] = kept
        self.history_end = start + len(kept)
        self.trimmed = True
        return True


def newest_turns(history: list[ChatMessage]) -> list[ChatMessage]:
    """The newest whole turns of ``history`` holding at most half its text (at least one message
    fewer), starting at a user message so no tool result loses its call."""
    sizes = [message_size(m) for m in history]
    budget = sum(sizes) // 2
    start = len(history)
    kept = 0
    for i in range(len(history) - 1, 0, -1):
        kept += sizes[i]
        if kept > budget:
            break
        start = i
    while start < len(history) and history[start].get("role") != "user":
        start += 1
    return history[start:]
