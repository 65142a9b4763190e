"""A fake, instant OpenAI-compatible upstream: ``python -m bench.upstream [--port N]``.

``POST /v1/chat/completions`` answers at once. The reply is steered by ``key=value`` words in
the text of the last *user* message (the gateway forwards that text unchanged; a system
message and history may come before it, and tool results after it):

* ``deltas=N``   - stream: N content deltas (default 8); non-stream: N words of content.
* ``delay_ms=M`` - stream: sleep M ms before each delta (default 0: written back to back).
* ``tool=NAME``  - if the conversation does not yet hold a tool result, answer with one call of
  the tool NAME whose arguments are the JSON in ``args=...`` (rest of the line), else a text.
* ``echo=1``     - non-stream: the content is the user message's text itself, so a benchmark
  can check that each reply answers its own message.
* ``toolecho=1`` - non-stream: the content is the text of the last tool result, so a benchmark
  can check that a tool's answer reached the model.
* ``report=1``   - non-stream: the content is a JSON report of what arrived, ``{"chars": <length
  of the user text>, "excerpt": <up to 3,000 characters from its first "[File: " label>}``, so a
  benchmark can check that a file's extracted text reached the model.

Non-stream replies are a complete ``chat.completion`` with ``usage``; streams are SSE
``data: {chunk}`` lines ending in ``data: [DONE]``. ``GET /bench/stats`` returns counters.
On start it prints ``READY <port>`` on stdout (the port is chosen by the OS unless given).
With ``--telegram``, it also serves a fake Telegram Bot API (:mod:`bench.faketg`) and
prints its port as a third word.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson
from aiohttp import web

_WORD = re.compile(r"\b([a-z_]+)=([0-9]+)\b")
_ARGS = re.compile(r"\bargs=(\{.*\})\s*$", re.S)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


class Stats:
    """Request counters, served at ``GET /bench/stats``."""

    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.deltas = 0
        self.tool_calls = 0
        self.max_messages = 0


def _text(content: object) -> str:
    """The text of a message ``content`` (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def parse_control(messages: list[dict[str, Any]]) -> tuple[dict[str, int], str, bool]:
    """Return the ``key=N`` words, the full text of the last user message, and if a tool answered."""
    text = ""
    for msg in reversed(messages):
        if msg.get("role") == "user":
            text = _text(msg.get("content"))
            break
    saw_tool = any(m.get("role") == "tool" for m in messages)
    return {k: int(v) for k, v in _WORD.findall(text)}, text, saw_tool


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _content(ctl: dict[str, int], text: str, deltas: int) -> str:
    """A non-stream reply's text: ``deltas`` words, or the echo or report the message asked for."""
    if ctl.get("echo"):
        return text
    if ctl.get("report"):
        start = max(0, text.find("[File: "))
        return orjson.dumps({"chars": len(text), "excerpt": text[start : start + 3000]}).decode()
    return " ".join(["tok"] * deltas)


def _last_tool_text(messages: list[dict[str, Any]]) -> str:
    return next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "tool"), "")


def _tool_call(text: str) -> dict[str, Any] | None:
    name = re.search(r"\btool=([A-Za-z_][\w-]*)", text)
    if name is None:
        return None
    found = _ARGS.search(text)
    args = found.group(1) if found else "{}"
    return {"id": "call_bench_1", "type": "function", "function": {"name": name.group(1), "arguments": args}}


class Upstream:
    """The request handler and its counters."""

    def __init__(self) -> None:
        self.stats = Stats()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route one request (low-level server: no router overhead)."""
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            return await self.completions(request)
        if request.path == "/bench/stats":
            return web.json_response(vars(self.stats))
        if request.path in ("/health", "/v1/models"):
            return web.json_response({"object": "list", "data": [{"id": "bench-model", "object": "model"}]})
        return web.Response(status=404, text="not found")

    async def completions(self, request: web.BaseRequest) -> web.StreamResponse:
        """``POST /v1/chat/completions``: an instant completion, streamed or not."""
        try:
            body = orjson.loads(await request.read())
            messages = body["messages"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.Response(status=400, text='{"error":{"message":"bad request"}}')
        stats = self.stats
        stats.requests += 1
        stats.max_messages = max(stats.max_messages, len(messages))
        model = str(body.get("model") or "bench-model")
        ctl, text, saw_tool = parse_control(messages)
        call = None if saw_tool else _tool_call(text)
        if call is not None:
            stats.tool_calls += 1
        if body.get("stream"):
            stats.streams += 1
            return await self._stream(request, model, ctl, call, bool(body.get("stream_options")))
        deltas = ctl.get("deltas", 1)
        content = _last_tool_text(messages) if ctl.get("toolecho") else _content(ctl, text, deltas)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        reply = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if call else "stop"}],
            "usage": _usage(len(messages), deltas),
        }
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

    async def _stream(
        self,
        request: web.BaseRequest,
        model: str,
        ctl: dict[str, int],
        call: dict[str, Any] | None,
        want_usage: bool,
    ) -> web.StreamResponse:
        deltas = ctl.get("deltas", 8)
        delay = ctl.get("delay_ms", 0) / 1000.0
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        await resp.write(_chunk(model, {"role": "assistant", "content": ""}))
        if call is not None:
            await resp.write(_chunk(model, {"tool_calls": [{"index": 0, **call}]}))
            await resp.write(_chunk(model, {}, "tool_calls"))
            deltas = 0
        else:
            piece = _chunk(model, {"content": "tok "})
            for _ in range(deltas):
                if delay:
                    await asyncio.sleep(delay)
                await resp.write(piece)
            self.stats.deltas += deltas
            await resp.write(_chunk(model, {}, "stop"))
        if want_usage:
            usage: dict[str, Any] = {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "model": model,
            }
            usage.update(choices=[], usage=_usage(1, deltas))
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(DONE)
        await resp.write_eof()
        return resp


def _listen(port: int, reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # several upstream processes on one port (bench.pg_section's workers section)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(port: int, telegram: bool, reuse_port: bool = False) -> None:
    """Serve until killed; print ``READY <port> [<telegram port>]`` once listening."""
    upstream = Upstream()
    server = web.Server(upstream.handle, access_log=None)
    runner = web.ServerRunner(server, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    sock = _listen(port, reuse_port)
    await web.SockSite(runner, sock, backlog=4096).start()
    ports = [str(sock.getsockname()[1])]
    if telegram:
        from bench.faketg import start_fake_telegram

        tg_sock = _listen(0)
        await start_fake_telegram(tg_sock)
        ports.append(str(tg_sock.getsockname()[1]))
    sys.stdout.write("READY " + " ".join(ports) + "\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse flags, pick uvloop when available, serve forever."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--telegram", action="store_true", help="also serve a fake Telegram Bot API")
    parser.add_argument("--reuse-port", action="store_true", help="share --port with other upstreams")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(serve(args.port, args.telegram, args.reuse_port))


def run_loop(main_coro: Coroutine[Any, Any, T]) -> T:
    """Run ``main_coro`` on uvloop when it is importable, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coro)
    return uvloop.run(main_coro)


if __name__ == "__main__":
    main()
