"""A conversation resent by the client (``api.clientHistory: "accept"``), validated into the
history the turn runs on: nothing of it is stored.

Chat UIs and multi-turn SDK helpers (Open WebUI, ``llm -c``, LangChain's message history)
send the whole conversation each time. It is checked as strictly as a one-message request:
known roles, a ``user`` message last, every ``tool`` message answering a call of the assistant
message just before it (each once), every call answered before the conversation moves on,
assistant ``content`` null only beside ``tool_calls``. Each error names ``messages[i]``.
System and developer messages, wherever they are, become this turn's extra instructions.
Images and files in earlier user messages go through the same pipeline as the last one's,
with one ``api.maxFiles`` budget for the whole request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from nanobot.errors import RequestError
from nanobot.gateway.requests import FileInput, text_of, user_content

_ROLES = "system, developer, user, assistant or tool"


@dataclass(frozen=True, slots=True)
class PastMessage:
    """One earlier message of the conversation: as the model gets it, except that a user
    message's ``files`` are still to be prepared (their text appended, images as parts)."""

    message: dict[str, Any]
    files: tuple[FileInput, ...] = ()


@dataclass(frozen=True, slots=True)
class Conversation:
    """The validated conversation: instructions, the history, and the last user message."""

    instructions: str
    history: tuple[PastMessage, ...]
    text: str
    files: tuple[FileInput, ...]


class _Checker:
    """Walks the messages once, keeping what the rules need: the calls awaiting a result."""

    def __init__(self, max_file_bytes: int, max_files: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.files = 0
        self.instructions: list[str] = []
        self.past: list[PastMessage] = []
        self.pending: dict[str, int] = {}  # call id -> its index in the assistant's tool_calls
        self.caller = -1  # index of the assistant message whose calls are pending
        self.answered: set[str] = set()

    def check(self, i: int, m: object) -> None:
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(role, str):
            raise RequestError(f"{where} must be an object with a 'role'", param=where)
        if role != "tool" and self.pending:
            self._unanswered()
        if role in ("system", "developer"):
            self.instructions.append(text_of(m.get("content"), f"{where}.content"))
        elif role == "user":
            self._user(m, where)
        elif role == "assistant":
            self._assistant(m, i, where)
        elif role == "tool":
            self._tool(m, where)
        else:
            raise RequestError(f"{where}: role {role!r} is not supported; use {_ROLES}", param=where)

    def _unanswered(self) -> None:
        call_id, j = next(iter(self.pending.items()))
        where = f"messages[{self.caller}]"
        raise RequestError(
            f"{where}.tool_calls[{j}] (id {call_id!r}) has no 'tool' message with its result: "
            "each tool call must be answered right after the assistant message that made it",
            param=where,
        )

    def _user(self, m: dict[str, Any], where: str) -> None:
        text, files = user_content(m.get("content"), f"{where}.content", self.max_file_bytes)
        self.files += len(files)
        if self.files > self.max_files:
            raise RequestError(
                f"{where}: the conversation holds more than {self.max_files} files and images "
                "(api.maxFiles counts every message of a request)",
                param=where,
            )
        self.past.append(PastMessage({"role": "user", "content": text}, files))

    def _assistant(self, m: dict[str, Any], i: int, where: str) -> None:
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or not calls):
            raise RequestError(f"{where}.tool_calls must be a non-empty list", param=where)
        if content is None and not calls:
            raise RequestError(f"{where}: an assistant message needs content or tool_calls", param=where)
        text = None if content is None else _assistant_text(content, f"{where}.content")
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [self._call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
            self.pending = {c["id"]: j for j, c in enumerate(message["tool_calls"])}
            if len(self.pending) != len(calls):
                raise RequestError(f"{where}.tool_calls: two calls share one id", param=where)
            self.caller = i
        self.past.append(PastMessage(message))

    def _call(self, call: object, where: str) -> dict[str, Any]:
        fn = call.get("function") if isinstance(call, dict) else None
        call_id = call.get("id") if isinstance(call, dict) else None
        if not isinstance(call_id, str) or not call_id or not isinstance(fn, dict):
            raise RequestError(f"{where} must be an object with an 'id' and a 'function'", param=where)
        name, args = fn.get("name"), fn.get("arguments", "")
        if isinstance(args, dict):  # (some clients send the parsed object)
            args = orjson.dumps(args).decode()
        if not isinstance(name, str) or not name or not isinstance(args, str):
            raise RequestError(
                f"{where}.function needs a 'name' and 'arguments' (a JSON string)", param=where
            )
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}

    def _tool(self, m: dict[str, Any], where: str) -> None:
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or call_id not in self.pending:
            said = "answers no call" if call_id not in self.answered else "answers a call already answered"
            raise RequestError(
                f"{where} (tool) {said}: its tool_call_id must name a pending call of the assistant "
                "message just before it",
                param=where,
            )
        del self.pending[call_id]
        self.answered.add(call_id)
        text = text_of(m.get("content"), f"{where}.content")
        self.past.append(PastMessage({"role": "tool", "tool_call_id": call_id, "content": text}))


def _assistant_text(content: object, param: str) -> str:
    """An assistant's text: a string, or text (and refusal) parts."""
    if isinstance(content, list):
        content = [
            {"type": "text", "text": p.get("refusal")}
            if isinstance(p, dict) and p.get("type") == "refusal"
            else p
            for p in content
        ]
    return text_of(content, param)


def parse_conversation(messages: list[object], max_file_bytes: int, max_files: int) -> Conversation:
    """Validate ``messages`` (a non-empty list) as a conversation ending in a user message."""
    checker = _Checker(max_file_bytes, max_files)
    for i, m in enumerate(messages):
        checker.check(i, m)
    last = len(messages) - 1
    final_message = messages[last]
    role = final_message.get("role") if isinstance(final_message, dict) else None
    if role != "user":
        raise RequestError(
            f"messages[{last}] ({role}): the last message must be the user's, the one to answer",
            param=f"messages[{last}]",
        )
    final = checker.past.pop()
    text = final.message["content"]
    if not text.strip() and not final.files:
        raise RequestError("the user message is empty", param=f"messages[{last}]")
    return Conversation(
        "\n\n".join(s for s in checker.instructions if s), tuple(checker.past), text, final.files
    )
