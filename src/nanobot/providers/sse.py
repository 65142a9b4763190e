"""Reading an upstream chat-completions event stream: lines of any length, deltas relayed as they come.

Lines are split here, over whatever chunks the socket delivers, rather than with
``StreamReader.readline``: that one fails a line over its 512 KiB limit (one big delta,
a long tool-call argument), while the same answer works without streaming. A line may be
as long as ``maxResponseBytes``; past that the call fails cleanly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import orjson

from nanobot.bus import Usage
from nanobot.errors import ProviderError
from nanobot.providers.base import LLMResponse, ToolCall, parse_usage
from nanobot.providers.upstream import api_error_message, context_length_error, excerpt, is_context_length

# Called with each piece of text as it arrives. It may return an awaitable: the stream is not
# read further until it resolves (back-pressure from a slow client to the upstream read).
DeltaCallback = Callable[[str], Awaitable[None] | None]


class _ToolCallParts:
    __slots__ = ("args", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.args: list[str] = []


class StreamReader:
    """One streamed call: feeds each ``data:`` line, relays text, assembles the answer.

    ``relayed`` says whether any text reached ``on_delta`` (then the call is not retried).
    """

    __slots__ = (
        "_calls",
        "_cap",
        "_finished",
        "_head",
        "_on_delta",
        "_text",
        "_url",
        "done",
        "finish",
        "relayed",
        "usage",
    )

    def __init__(self, on_delta: DeltaCallback, url: str, cap: int) -> None:
        self._on_delta = on_delta
        self._url = url
        self._cap = cap
        self._text: list[str] = []
        self._calls: dict[int, _ToolCallParts] = {}
        self._finished = False
        self._head = b""  # the stream's first bytes, to say what it was if it was no stream
        self.done = False
        self.relayed = False
        self.finish = "stop"
        self.usage = Usage()

    async def read(self, content: aiohttp.StreamReader) -> LLMResponse:
        """Read the stream to ``[DONE]`` (or its end) and return the assembled answer."""
        on_delta = self._on_delta
        pending: list[bytes] = []  # the start of a line not yet ended
        size = 0
        total = 0  # the whole stream is bounded too, not only each line
        async for chunk in content.iter_any():
            if not self._head:
                self._head = chunk[:512]
            total += len(chunk)
            if total > self._cap:
                raise ProviderError(
                    f"upstream LLM at {self._url} sent a stream larger than {self._cap} bytes "
                    "(providers.*.maxResponseBytes)"
                )
            if b"\n" not in chunk:
                size += len(chunk)
                if size > self._cap:
                    raise ProviderError(
                        f"upstream LLM at {self._url} sent a stream line longer than {self._cap} bytes "
                        "(providers.*.maxResponseBytes)"
                    )
                pending.append(chunk)
                continue
            if pending:
                pending.append(chunk)
                chunk = b"".join(pending)
                pending.clear()
            lines = chunk.split(b"\n")
            tail = lines.pop()
            size = len(tail)
            if tail:
                pending.append(tail)
            for line in lines:  # the hot loop: one pass per event, no call but the parse
                if line.startswith(b"data:"):
                    try:  # free unless raised (3.11's zero-cost exceptions)
                        piece = self._feed(line[5:].strip())
                    except (AttributeError, KeyError, TypeError, ValueError) as exc:
                        raise self._odd(line) from exc
                    if piece:
                        self.relayed = True
                        waiting = on_delta(piece)
                        if waiting is not None:
                            await waiting
                    if self.done:
                        return self._result()
        if pending:  # the last line, without its newline
            line = b"".join(pending)
            if line.startswith(b"data:"):
                try:
                    piece = self._feed(line[5:].strip())
                except (AttributeError, KeyError, TypeError, ValueError) as exc:
                    raise self._odd(line) from exc
                await self._relay(piece)
        return self._result()

    async def _relay(self, piece: str | None) -> None:
        if piece:
            self.relayed = True
            waiting = self._on_delta(piece)
            if waiting is not None:
                await waiting

    def _feed(self, data: bytes) -> str | None:
        """Take one event's data; returns the text to relay, if any."""
        if data == b"[DONE]":
            self.done = True
            return None
        if not data.startswith(b"{"):
            if not data:
                return None
            raise ProviderError(
                f"upstream LLM at {self._url} sent a stream event that is not JSON: "
                f"{excerpt(data[:1024].decode('utf-8', 'replace'))}"
            )
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProviderError(
                f"upstream LLM at {self._url} sent a stream event that is not JSON: "
                f"{excerpt(data[:1024].decode('utf-8', 'replace'))}"
            ) from exc
        if "error" in chunk:
            self._fail(chunk, data)
        if chunk.get("usage"):
            self.usage = parse_usage(chunk["usage"])
        out: str | None = None
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            piece = delta.get("content")
            if piece:
                self._text.append(piece)
                out = piece if out is None else out + piece
            for tc in delta.get("tool_calls") or ():
                parts = self._calls.setdefault(int(tc.get("index", 0)), _ToolCallParts())
                parts.id = tc.get("id") or parts.id
                fn = tc.get("function") or {}
                parts.name = fn.get("name") or parts.name
                if fn.get("arguments"):
                    parts.args.append(fn["arguments"])
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                self._finished = True
        return out

    def _odd(self, line: bytes) -> ProviderError:
        return ProviderError(
            f"upstream LLM at {self._url} sent a stream event of an unexpected shape: "
            f"{excerpt(line[:1024].decode('utf-8', 'replace'))}"
        )

    def _fail(self, chunk: dict[str, object], data: bytes) -> None:
        message = api_error_message(chunk) or data[:1024].decode("utf-8", "replace")
        if not self.relayed and is_context_length(message):
            raise context_length_error(self._url, "an error event in the stream", excerpt(message))
        raise ProviderError(f"upstream LLM at {self._url} sent an error mid-stream: {excerpt(message, 1000)}")

    def _result(self) -> LLMResponse:
        if not (self.done or self._finished):
            if not self._text and not self._calls and not self.usage.total_tokens:
                began = excerpt(self._head.decode("utf-8", "replace")) if self._head else "nothing"
                raise ProviderError(
                    f"upstream LLM at {self._url} ended the stream without any event; it sent: {began}"
                )
            raise ProviderError(f"upstream LLM at {self._url} closed the stream before it finished")
        calls = tuple(
            ToolCall(p.id or f"call_{i}", p.name, "".join(p.args) or "{}")
            for i, p in sorted(self._calls.items())
        )
        return LLMResponse("".join(self._text), calls, self.finish, self.usage)

    async def relay_whole(self, answer: LLMResponse) -> LLMResponse:
        """Relay a whole answer that came as one JSON body although a stream was asked for."""
        await self._relay(answer.content)
        return answer
