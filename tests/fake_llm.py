"""A scripted OpenAI-compatible LLM: a real aiohttp server on loopback for the gateway to call.

Push :class:`Step` objects to script the next replies; with nothing scripted it echoes
the last user text. Every request body it receives is kept in ``requests``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

Json = dict[str, Any]


@dataclass
class Step:
    """One scripted upstream reply."""

    text: str = ""
    chunks: list[str] | None = None  # stream these deltas (default: the text in one chunk)
    tool_calls: list[tuple[str, Json]] = field(default_factory=list)
    status: int = 200
    error: str = "scripted failure"
    retry_after: float | None = None
    delay: float = 0.0  # before answering at all
    stall: bool = False  # never answer (until the server stops)
    gate: asyncio.Event | None = None  # stream the first chunk, then wait for this before the rest
    drop_after: int | None = None  # close the connection after this many chunks
    finish_reason: str | None = None
    usage: tuple[int, int] = (10, 5)
    body: bytes | None = None  # send exactly this body (with ``status`` and ``content_type``)
    content_type: str = "application/json"
    sse: list[bytes] | None = None  # stream exactly these bytes, write by write, as text/event-stream


def last_user_text(body: Json) -> str:
    """The text of the last user message in an upstream request."""
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def prompt_chars(body: Json) -> int:
    """How many characters of text an upstream request's messages hold."""
    total = 0
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content)
        for call in m.get("tool_calls") or ():
            total += len(call["function"]["arguments"])
    return total


class FakeLLM:
    """The fake upstream; mount :meth:`app` on an aiohttp test server."""

    def __init__(self) -> None:
        self.steps: collections.deque[Step] = collections.deque()
        self.requests: list[Json] = []
        self.headers: list[dict[str, str]] = []
        self.received = asyncio.Event()
        self.cancelled = asyncio.Event()
        self._ids = itertools.count(1)
        # A model's context: a request whose messages hold more characters than this is refused
        # (before any scripted step is used) with ``context_status`` and ``context_error``.
        self.max_context_chars: int | None = None
        self.context_status = 400
        self.context_error: Json = {
            "message": "This model's maximum context length is 100 tokens. However, your messages "
            "resulted in 200 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }

    def push(self, *steps: Step) -> None:
        """Script the next replies, in order."""
        self.steps.extend(steps)

    def app(self) -> web.Application:
        """The aiohttp application serving ``/v1/chat/completions``."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.received.set()
        if self.max_context_chars is not None and prompt_chars(body) > self.max_context_chars:
            return web.json_response({"error": self.context_error}, status=self.context_status)
        step = self.steps.popleft() if self.steps else Step(text=f"echo: {last_user_text(body)}")
        try:
            return await self._answer(request, body, step)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def _answer(self, request: web.Request, body: Json, step: Step) -> web.StreamResponse:
        if step.stall:
            await asyncio.Event().wait()
        if step.delay:
            await asyncio.sleep(step.delay)
        if step.body is not None:
            return web.Response(body=step.body, status=step.status, content_type=step.content_type)
        if step.sse is not None:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for piece in step.sse:
                await resp.write(piece)
            await resp.write_eof()
            return resp
        if step.status != 200:
            headers = {"Retry-After": str(step.retry_after)} if step.retry_after is not None else {}
            err = {"error": {"message": step.error, "type": "server_error", "param": None, "code": None}}
            return web.json_response(err, status=step.status, headers=headers)
        calls = [
            {
                "id": f"call_{next(self._ids)}",
                "type": "function",
                "function": {"name": name, "arguments": orjson.dumps(args).decode()},
            }
            for name, args in step.tool_calls
        ]
        finish = step.finish_reason or ("tool_calls" if calls else "stop")
        usage = {
            "prompt_tokens": step.usage[0],
            "completion_tokens": step.usage[1],
            "total_tokens": sum(step.usage),
        }
        if not body.get("stream"):
            message: Json = {"role": "assistant", "content": step.text or None}
            if calls:
                message["tool_calls"] = calls
            return web.json_response(
                {
                    "id": "up-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )
        return await self._stream(request, body, step, calls, finish, usage)

    async def _stream(
        self, request: web.Request, body: Json, step: Step, calls: list[Json], finish: str, usage: Json
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(delta: Json, finish_reason: str | None = None) -> None:
            chunk = {
                "id": "up-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

        chunks = step.chunks if step.chunks is not None else ([step.text] if step.text else [])
        for i, piece in enumerate(chunks):
            if step.drop_after is not None and i >= step.drop_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            await send({"content": piece})
            if i == 0 and step.gate is not None:
                await step.gate.wait()
        for i, call in enumerate(calls):
            fn = call["function"]
            half = len(fn["arguments"]) // 2
            await send(
                {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": fn["name"], "arguments": fn["arguments"][:half]},
                        }
                    ]
                }
            )
            await send({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"][half:]}}]})
        await send({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(
                b"data: " + orjson.dumps({"id": "up-1", "choices": [], "usage": usage}) + b"\n\n"
            )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
