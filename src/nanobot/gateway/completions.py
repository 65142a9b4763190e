"""``POST /v1/chat/completions``: HTTP in, an :class:`InboundMessage` onto the bus, the answer back out."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from nanobot.bus import InboundKind, InboundMessage, OutboundKind, OutboundMessage
from nanobot.errors import NanobotError, PayloadTooLargeError, RequestError, UnsupportedMediaError
from nanobot.gateway.errors import REQUEST_ID
from nanobot.gateway.ids import new_id
from nanobot.gateway.multipart import form_stream, read_multipart
from nanobot.gateway.requests import ChatRequest, FileInput, check_model, check_session_id, parse_chat_request
from nanobot.gateway.sse import DONE, KEEP_ALIVE, ChunkWriter, error_event
from nanobot.gateway.state import STATE, GatewayState
from nanobot.gateway.uploads import build_inbound

_URLENCODED = "application/x-www-form-urlencoded"
_JSON_TYPES = frozenset({"application/json", "", _URLENCODED, "text/plain"})
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _form_request(fields: dict[str, str], files: tuple[FileInput, ...], model: str) -> ChatRequest:
    check_model(fields.get("model") or None, model)
    text = fields.get("message", "")
    if not text.strip() and not files:
        raise RequestError("the 'message' field is empty and no files were sent", param="message")
    return ChatRequest(
        text=text,
        session_id=check_session_id(fields.get("session_id")),
        stream=form_stream(fields.get("stream")),
        include_usage=False,
        instructions=fields.get("system", ""),
        files=files,
    )


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, bounded by ``limit``; unlike ``request.read()`` it is not kept on the
    request, so a large base64 upload is held once, not for the whole turn."""
    too_large = PayloadTooLargeError(
        f"the request is larger than the limit of {limit} bytes (api.maxRequestBytes)"
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: web.Request, state: GatewayState) -> ChatRequest:
    ctype = request.content_type
    if ctype == "multipart/form-data":
        api = state.config.api
        form = await read_multipart(
            request,
            max_file_bytes=api.max_file_bytes,
            max_files=api.max_files,
            max_request_bytes=api.max_request_bytes,
        )
        return _form_request(form.fields, form.files, state.model)
    if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
        raise UnsupportedMediaError(
            f"Content-Type {ctype!r} is not supported; send application/json or multipart/form-data"
        )
    raw = await _read_body(request, state.config.api.max_request_bytes)
    if ctype == _URLENCODED and not raw.lstrip().startswith(b"{"):
        # `curl -d "message=hi"`: the same text fields as a multipart form, without files.
        try:
            fields = dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=True))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError("We could not parse the form body of your request.") from exc
        return _form_request(fields, (), state.model)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"We could not parse the JSON body of your request: {exc}") from exc
    del raw  # the parsed body is all that is needed from here on
    return parse_chat_request(body, state.model, state.limits.max_file_bytes)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Validate, hand the turn to the agent over the bus, and answer as JSON or SSE."""
    state = request.app[STATE]
    chat = await _parse(request, state)
    rid: str = request[REQUEST_ID]
    # Replies are routed by our own id: a client may send the same x-request-id twice.
    turn = new_id("turn_")
    msg = await build_inbound(chat, turn, state.limits)
    queue = state.api.open(turn)
    state.bus.publish_inbound(msg)
    finished = False
    try:
        if chat.stream:
            resp, finished = await _stream(request, state, chat, queue, rid)
            return resp
        resp = await _complete(state, queue)
        finished = True
        return resp
    finally:
        state.api.close(turn)
        if not finished:  # client gone or failure: stop the turn and its upstream call
            state.bus.publish_inbound(
                InboundMessage("api", msg.chat_id, request_id=turn, kind=InboundKind.CANCEL)
            )


def _completion_id() -> str:
    return new_id("chatcmpl-")


async def _complete(state: GatewayState, queue: asyncio.Queue[OutboundMessage]) -> web.Response:
    said: list[str] = []
    while True:
        out = await queue.get()
        if out.kind is OutboundKind.REPLY:
            break
        if out.kind is OutboundKind.ERROR:
            raise out.error or NanobotError("the turn failed")
        if out.kind is OutboundKind.MESSAGE:
            said.append(out.content)
    content = "\n\n".join([*said, out.content]) if said else out.content
    usage = (
        out.usage.as_dict() if out.usage else {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )
    body = {
        "id": _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": out.finish_reason or "stop",
            }
        ],
        "usage": usage,
        "system_fingerprint": None,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


class _KeepAlive:
    """Puts a keep-alive marker on the queue whenever the stream has been quiet for ``interval``."""

    __slots__ = ("_handle", "_interval", "_loop", "_queue", "last_write")

    def __init__(self, queue: asyncio.Queue[OutboundMessage], interval: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = queue
        self._interval = interval
        self.last_write = self._loop.time()
        self._handle = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        due = self.last_write + self._interval
        if now >= due - 0.001:
            self._queue.put_nowait(_KEEPALIVE_MARK)
            self.last_write = now
            due = now + self._interval
        self._handle = self._loop.call_at(due, self._tick)

    def wrote(self) -> None:
        """Note that the stream just carried data."""
        self.last_write = self._loop.time()

    def cancel(self) -> None:
        """Stop the timer."""
        self._handle.cancel()


_KEEPALIVE_MARK = OutboundMessage("", "", kind=OutboundKind.DELTA, reply_to="keep-alive")


async def _stream(
    request: web.Request,
    state: GatewayState,
    chat: ChatRequest,
    queue: asyncio.Queue[OutboundMessage],
    rid: str,
) -> tuple[web.StreamResponse, bool]:
    """Relay the turn as SSE; returns the response and whether the stream reached its end."""
    resp = web.StreamResponse(headers={**_SSE_HEADERS, "x-request-id": rid})
    writer = ChunkWriter(_completion_id(), int(time.time()), state.model)
    await resp.prepare(request)
    await resp.write(writer.role())
    keepalive = _KeepAlive(queue, state.config.api.keep_alive_seconds)
    try:
        return resp, await _relay(resp, writer, chat, queue, keepalive)
    except ConnectionResetError:  # the client went away: the caller cancels the turn
        return resp, False
    finally:
        keepalive.cancel()


async def _relay(
    resp: web.StreamResponse,
    writer: ChunkWriter,
    chat: ChatRequest,
    queue: asyncio.Queue[OutboundMessage],
    keepalive: _KeepAlive,
) -> bool:
    while True:
        out = await queue.get()
        frames: list[bytes] = []
        # Relay everything already queued in one write: fewer syscalls under load, same order.
        while True:
            kind = out.kind
            if out is _KEEPALIVE_MARK:
                frames.append(KEEP_ALIVE)
            elif kind is OutboundKind.DELTA:
                frames.append(writer.content(out.content))
            elif kind is OutboundKind.MESSAGE:
                frames.append(writer.content(out.content + "\n\n"))
            elif kind is OutboundKind.REPLY:
                frames.append(writer.finish(out.finish_reason or "stop"))
                if chat.include_usage and out.usage is not None:
                    frames.append(writer.usage(out.usage))
                frames.append(DONE)
                await resp.write(b"".join(frames))
                await resp.write_eof()
                return True
            elif kind is OutboundKind.ERROR:
                frames.append(error_event(out.error or NanobotError("the turn failed")))
                await resp.write(b"".join(frames))
                await resp.write_eof()
                return True
            if queue.empty():
                break
            out = queue.get_nowait()
        await resp.write(b"".join(frames))
        keepalive.wrote()
