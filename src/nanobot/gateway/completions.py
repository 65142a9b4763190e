"""``POST /v1/chat/completions``: HTTP in, an :class:`InboundMessage` onto the bus, the answer back out."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from nanobot.bus import InboundKind, InboundMessage, OutboundKind, Usage
from nanobot.channels.api import Reply
from nanobot.config import ApiConfig
from nanobot.errors import NanobotError, PayloadTooLargeError, RequestError, UnsupportedMediaError
from nanobot.gateway.bodies import read_bounded
from nanobot.gateway.errors import REQUEST_ID
from nanobot.gateway.ids import new_id
from nanobot.gateway.multipart import form_stream, read_multipart
from nanobot.gateway.requests import ChatRequest, FileInput, check_model, check_session_id, parse_chat_request
from nanobot.gateway.sse import DONE, KEEP_ALIVE, ChunkWriter, error_event, tool_event
from nanobot.gateway.state import STATE, GatewayState
from nanobot.gateway.uploads import build_inbound, inbound_message

log = logging.getLogger(__name__)

_URLENCODED = "application/x-www-form-urlencoded"
_JSON_TYPES = frozenset({"application/json", "", _URLENCODED, "text/plain"})
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _form_request(
    fields: dict[str, str],
    files: tuple[FileInput, ...],
    model: str,
    header_session: str | None,
    api: ApiConfig,
) -> ChatRequest:
    check_model(fields.get("model") or None, model)
    text = fields.get("message", "")
    if not text.strip() and not files:
        raise RequestError("the 'message' field is empty and no files were sent", param="message")
    given = fields.get("session_id") or header_session
    stream = form_stream(fields.get("stream"))
    return ChatRequest(
        text=text,
        session_id=check_session_id(fields.get("session_id"), header_session or "default"),
        stream=stream,
        include_usage=False,
        # the form's stream_options.include_tool_events (the web chat's uploads ask for them)
        tool_events=stream and form_stream(fields.get("include_tool_events"), "include_tool_events"),
        instructions=fields.get("system", ""),
        files=files,
        # api.clientHistory "accept": a request naming no session is a conversation of its own
        history=() if given is None and api.client_history == "accept" else None,
    )


def _header_session(request: web.Request) -> str | None:
    """The ``X-Session-Id`` header's session id, checked; None when absent. A body's
    ``session_id`` (JSON or form field) wins over it."""
    value = request.headers.get("X-Session-Id")
    if not value:
        return None
    try:
        return check_session_id(value)
    except RequestError as exc:
        message = exc.message.replace("session_id", "X-Session-Id", 1)
        raise RequestError(message, param="X-Session-Id") from None


def _too_large(limit: int) -> PayloadTooLargeError:
    # Built only when needed: an exception per request was measurable on the hot path.
    return PayloadTooLargeError(
        f"the request is larger than the limit of {limit} bytes (api.maxRequestBytes)"
    )


async def _parse(request: web.Request, state: GatewayState) -> ChatRequest:
    ctype = request.content_type
    api = state.config.api
    header_session = _header_session(request)
    if ctype == "multipart/form-data":
        form = await read_multipart(
            request,
            max_file_bytes=api.max_file_bytes,
            max_files=api.max_files,
            max_request_bytes=api.max_request_bytes,
        )
        return _form_request(form.fields, form.files, state.model, header_session, api)
    if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
        raise UnsupportedMediaError(
            f"Content-Type {ctype!r} is not supported; send application/json or multipart/form-data"
        )
    length = request.content_length
    if length is not None and length <= api.max_request_bytes:
        try:  # the usual case, read here (no coroutine of ours): one call, usually buffered already
            raw = await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:  # the client stopped sending: what came
            raw = exc.partial
    else:
        limit = api.max_request_bytes
        raw = await read_bounded(request, limit, lambda: _too_large(limit))
    if ctype == _URLENCODED and not raw.lstrip().startswith(b"{"):
        # `curl -d "message=hi"`: the same text fields as a multipart form, without files.
        try:
            fields = dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=True))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError("We could not parse the form body of your request.") from exc
        return _form_request(fields, (), state.model, header_session, api)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"We could not parse the JSON body of your request: {exc}") from exc
    del raw  # the parsed body is all that is needed from here on
    return parse_chat_request(
        body,
        state.model,
        state.limits.max_file_bytes,
        header_session=header_session,
        client_history=api.client_history == "accept",
        max_files=api.max_files,
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Validate, hand the turn to the agent over the bus, and answer as JSON or SSE."""
    state = request.app[STATE]
    api = state.api
    api.admit()  # before the body is read: 429 past api.maxConcurrentTurns, 503 when shutting down
    try:
        chat = await _parse(request, state)
        # Replies are routed by our own id: a client may send the same x-request-id twice.
        turn = new_id("turn_")
        if chat.files or chat.history is not None:
            msg = await build_inbound(chat, turn, state.limits)
        else:
            msg = inbound_message(chat, turn)  # (no coroutine for the usual, text-only request)
        reply = api.open(turn, chat.stream, chat.tool_events)
        finished = False
        try:
            if chat.stream:
                state.bus.publish_inbound(msg)  # the turn runs in its own task: this one writes
                resp, finished = await _stream(request, state, chat, reply, request[REQUEST_ID])
                return resp
            resp = await _complete(state, msg, reply)
            finished = True
            return resp
        finally:
            api.close(turn)
            if not finished:  # client gone or failure: stop the turn and its upstream call
                state.bus.publish_inbound(
                    InboundMessage("api", msg.chat_id, request_id=turn, kind=InboundKind.CANCEL)
                )
    finally:
        api.release()


# The chat.completion object, written around what varies (each string through orjson, which
# escapes it): half the instructions of building the same dict and serialising it (13k -> 7k).
_ANSWER = (
    b'{"id":"%s","object":"chat.completion","created":%d,"model":%s,'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":%s,"refusal":null},'
    b'"logprobs":null,"finish_reason":%s}],'
    b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d},"system_fingerprint":null}'
)
_STOP = orjson.dumps("stop")
_NO_USAGE = Usage()


def _completion_id(turn: str) -> str:
    """The turn's own number (unique as its id is) as a completion id: ``chatcmpl-…``."""
    return "chatcmpl-" + turn[5:]  # (after "turn_")


async def _complete(state: GatewayState, msg: InboundMessage, reply: Reply) -> web.Response:
    """Run the turn in this task (no task of its own: see ``AgentLoop.serve``), answer with JSON."""
    task = reply.turn_runs_here()
    try:
        running = state.bus.run_inbound(msg)
        if running is not None:
            await running
        if not reply.answered():  # (it is, unless the bus has no runner and queued the message)
            await reply.wait()
    except asyncio.CancelledError:
        # A refusal at shutdown cancels the turn here (Reply.refuse): answer it with its 503,
        # unless this task was cancelled for another reason too (the client left).
        if reply.refused is None or task.uncancel() > 0:
            raise
    if reply.refused is not None:
        raise reply.refused
    out = reply.end
    assert out is not None  # wait() returns on an end or a refusal
    if out.kind is OutboundKind.ERROR:
        raise out.error or NanobotError("the turn failed")
    said = reply.pieces  # `message`-tool texts for this chat, said before the answer
    content = "\n\n".join([*said, out.content]) if said else out.content
    usage = out.usage or _NO_USAGE
    finish = out.finish_reason or "stop"
    body = _ANSWER % (
        _completion_id(msg.request_id).encode(),
        int(time.time()),
        state.model_json,
        orjson.dumps(content),
        _STOP if finish == "stop" else orjson.dumps(finish),
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    )
    return web.Response(body=body, content_type="application/json")


class _Pacer:
    """One timer per stream: asks for a keep-alive comment after ``interval`` of quiet, and cuts
    the connection when one write has not completed for ``stall`` seconds (the reader stopped
    reading: the socket buffers are full). Each write costs one clock read."""

    __slots__ = (
        "_cut",
        "_handle",
        "_interval",
        "_loop",
        "_reply",
        "_rid",
        "_since",
        "_stall",
        "_transport",
        "_writing",
    )

    def __init__(self, request: web.Request, reply: Reply, api: ApiConfig, rid: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._reply = reply
        self._transport = request.transport
        self._rid = rid
        self._interval = api.keep_alive_seconds
        self._stall = api.stream_stall_timeout
        self._cut = False
        now = self._loop.time()
        self._since = now  # when the current write began (writing), or the last one did (quiet)
        self._writing = False
        self._handle = self._loop.call_at(now + min(self._interval, self._stall), self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        if self._writing:
            due = self._since + self._stall
            if now >= due - 0.001:
                self._cut_reader()
                return
        else:
            if now >= self._since + self._interval - 0.001:
                self._reply.ask_keepalive()
                self._since = now
            # a write may start at any moment: look again within `stall`
            due = min(self._since + self._interval, now + self._stall)
        self._handle = self._loop.call_at(due, self._tick)

    def _cut_reader(self) -> None:
        log.warning(
            "cut a stream reader that read nothing for %g s (api.streamStallTimeout); request %s",
            self._stall,
            self._rid,
        )
        self._cut = True
        if self._transport is not None:
            self._transport.abort()  # close() would wait for the unsent buffer forever

    async def write(self, resp: web.StreamResponse, data: bytes, *, last: bool = False) -> None:
        """Write ``data`` (and end the stream if ``last``); ConnectionResetError if the reader was cut."""
        self._since = self._loop.time()
        self._writing = True
        await (resp.write_eof(data) if last else resp.write(data))
        self._writing = False
        if self._cut:
            raise ConnectionResetError("the stream reader was cut")

    def cancel(self) -> None:
        """Stop the timer."""
        self._handle.cancel()


async def _stream(
    request: web.Request,
    state: GatewayState,
    chat: ChatRequest,
    reply: Reply,
    rid: str,
) -> tuple[web.StreamResponse, bool]:
    """Relay the turn as SSE; returns the response and whether the turn reached its end."""
    resp = web.StreamResponse(headers={**_SSE_HEADERS, "x-request-id": rid})
    writer = ChunkWriter(_completion_id(reply.turn), int(time.time()), state.model)
    try:
        await resp.prepare(request)  # (the client may already be gone)
    except ConnectionResetError:
        return resp, False
    pacer = _Pacer(request, reply, state.config.api, rid)
    try:
        await pacer.write(resp, writer.role())
        return resp, await _relay(resp, writer, chat, reply, pacer)
    except ConnectionResetError:  # the client went away or was cut: the caller cancels the turn
        return resp, False
    finally:
        pacer.cancel()


def _with_events(
    frames: list[bytes], writer: ChunkWriter, events: list[tuple[int, dict[str, str]]], pieces: list[str]
) -> None:
    """Text and tool events in the order the agent said them."""
    done = 0
    for at, event in events:
        if at > done:
            frames.append(writer.content("".join(pieces[done:at])))
            done = at
        frames.append(tool_event(event))
    if done < len(pieces):
        frames.append(writer.content("".join(pieces[done:])))


async def _relay(
    resp: web.StreamResponse, writer: ChunkWriter, chat: ChatRequest, reply: Reply, pacer: _Pacer
) -> bool:
    while True:
        await reply.wait()
        # Everything said since the last write goes out as one chunk: under load, or to a
        # slow reader, consecutive deltas coalesce instead of queueing frame by frame.
        frames: list[bytes] = []
        if reply.events:
            _with_events(frames, writer, reply.take_events(), reply.take())
        elif reply.pieces:
            frames.append(writer.content("".join(reply.take())))
        elif reply.keepalive_due:
            frames.append(KEEP_ALIVE)
        reply.keepalive_due = False
        out = reply.end
        if out is not None:
            if out.kind is OutboundKind.REPLY:
                frames.append(writer.finish(out.finish_reason or "stop"))
                if chat.include_usage and out.usage is not None:
                    frames.append(writer.usage(out.usage))
                frames.append(DONE)
            else:
                frames.append(error_event(out.error or NanobotError("the turn failed")))
            await pacer.write(resp, b"".join(frames), last=True)
            return True
        if reply.refused is not None:  # shutting down: say so, the caller cancels the turn
            frames.append(error_event(reply.refused))
            await pacer.write(resp, b"".join(frames), last=True)
            return False
        await pacer.write(resp, b"".join(frames))
