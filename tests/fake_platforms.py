"""Fake chat platforms for tests: aiohttp servers on loopback that behave like the real ones.

``FakeTelegram`` serves the Bot API (getMe, getUpdates long polling, sendMessage with
Telegram's HTML checks, getFile and ``/file/bot<token>/<path>`` downloads, setWebhook and
deleteWebhook) and can script failures: 429 with ``retry_after``, 5xx, 403, and 400 "can't
parse entities" (and getMe failures, for a platform that is unreachable at start). Like
Telegram it forgets an update once a getUpdates call confirms it (an offset past its id),
answers 409 to getUpdates while a webhook is set, and ends an older long poll with 409 when
another connection polls (one consumer per token); it records which connections polled.
``FakeDiscord`` serves REST (``/users/@me``, message posts with nonce de-duplication,
429s and rate-limit headers), attachment downloads from its own origin, and a Gateway
websocket (HELLO, IDENTIFY/RESUME, heartbeats and ACKs, MESSAGE_CREATE, dropped connections).
Both record what they received, and ``until`` waits for a condition on that record.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from nanobot.bus import MessageBus
from nanobot.channels.api import ApiChannel
from nanobot.config import Config, parse_config
from nanobot.delivery.manager import ChannelManager, build_channel_manager
from nanobot.delivery.ownership import LaneOwnership
from nanobot.storage.outbox import Outbox, State
from nanobot.storage.sqlite.outbox import connect, select

TELEGRAM_TOKEN = "123456:SECRET-telegram-token-abc"
DISCORD_TOKEN = "SECRET.discord.token-xyz"
DISCORD_BOT_ID = "999"
SRC = Path(__file__).resolve().parents[1] / "src"  # on PYTHONPATH for `nanobot serve` processes


class Recorder:
    """A condition that fakes notify on every change, so tests wait for state, not time."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()

    async def changed(self) -> None:
        """Wake everyone waiting in ``until``."""
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, or fail after ``within`` seconds."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(predicate)


@dataclass
class Failure:
    """A scripted error answer: HTTP status, description, and optional retry_after."""

    status: int
    description: str = "scripted failure"
    retry_after: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


class FileShelf:
    """Files a fake platform serves for download, with a record of what was fetched.

    ``stream`` sends bodies chunked with no Content-Length (the client must cap as it
    reads); ``status`` answers every download with that HTTP error instead; ``gate``,
    when set, parks downloads until it is set (``parked`` counts them).
    """

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.downloads: list[str] = []  # keys whose download started, in order
        self.stream = False
        self.status = 200
        self.gate: asyncio.Event | None = None
        self.parked = 0
        self._ids = itertools.count(1)

    def put(self, data: bytes, key: str = "") -> str:
        """Store ``data`` (under ``key``, or a fresh id) and return the key."""
        key = key or f"file-{next(self._ids)}"
        self.blobs[key] = data
        return key

    async def serve(self, request: web.Request, key: str, recorder: Recorder) -> web.StreamResponse:
        """Answer a download of ``key``."""
        self.downloads.append(key)
        await recorder.changed()
        if self.gate is not None and not self.gate.is_set():
            self.parked += 1
            await recorder.changed()
            await self.gate.wait()
        if key not in self.blobs or self.status != 200:
            return web.Response(status=404 if self.status == 200 else self.status, text="no such file")
        data = self.blobs[key]
        if not self.stream:
            return web.Response(body=data, content_type="application/octet-stream")
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client stops reading at its limit
            for start in range(0, len(data), 65536):
                await resp.write(data[start : start + 65536])
            await resp.write_eof()
        return resp


# --------------------------------------------------------------------------- Telegram

_TELEGRAM_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "span",
                  "tg-spoiler", "blockquote", "tg-emoji"}  # fmt: skip


class _TelegramHtml(HTMLParser):
    """Rejects what Telegram rejects: unknown tags and unbalanced ones."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _TELEGRAM_TAGS:
            raise ValueError(f'Unsupported start tag "{tag}"')
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            raise ValueError(f'Can\'t find end tag corresponding to start tag "{tag}"')

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def telegram_visible_text(html: str) -> str:
    """The text Telegram shows for ``html``; raises ValueError when Telegram would reject it."""
    parser = _TelegramHtml()
    parser.feed(html)
    parser.close()
    if parser.stack:
        raise ValueError(f'Can\'t find end tag corresponding to start tag "{parser.stack[-1]}"')
    return "".join(parser.text)


class FakeTelegram(Recorder):
    """The Telegram Bot API, as far as nanobot uses it."""

    def __init__(self, token: str = TELEGRAM_TOKEN) -> None:
        super().__init__()
        self.token = token
        self.sent: list[dict[str, Any]] = []  # accepted sendMessage payloads, in order
        self.send_calls = 0
        self.send_times: list[float] = []  # loop time of every sendMessage call
        self.failures: deque[Failure] = deque()  # answers for the next sendMessage calls
        self.get_me_calls = 0
        self.get_me_failures: deque[Failure] = deque()  # answers for the next getMe calls
        self.get_me_gate: asyncio.Event | None = None  # when set, getMe calls wait for it
        self.rate_limit_every = 0  # when > 0, every Nth sendMessage call gets a 429
        self.rate_limit_retry_after = 1.0
        self.hold_after: int | None = None  # once this many are sent, park sendMessage calls until release
        self.send_delay = 0.0  # seconds each sendMessage call takes (a slow platform)
        self.release = asyncio.Event()
        self.parked = 0
        self.redirect_loop = False  # redirect every call to itself: aiohttp's error then names the URL
        self.updates: list[dict[str, Any]] = []
        self.get_updates_calls = 0
        self.confirmed_offset = 0  # the highest offset a getUpdates call has sent: updates below are handled
        self.freeze_confirmations = False  # ignore offsets, as if the confirming calls never arrived
        self.pollers: list[tuple[str, int]] = []  # the client address of every getUpdates call, in order
        self.conflicts = 0  # long polls ended by another connection's getUpdates (409)
        self.webhook: dict[str, Any] | None = None  # the last setWebhook payload, until deleteWebhook
        self.webhook_calls: list[tuple[str, dict[str, Any]]] = []  # (method, payload) of set/deleteWebhook
        self._polls: dict[asyncio.Task[Any], web.Request] = {}  # long polls in progress
        self.files = FileShelf()  # file_id → bytes, served by getFile and /file/bot<token>/<path>
        self.get_file_calls: list[str] = []  # file_ids asked for, in order
        self._message_ids = itertools.count(1)
        self._closing = False
        self.app = web.Application()
        self.app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self.app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self.app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        self._closing = True
        await self.changed()

    def add_text(self, chat_id: int, user_id: int, text: str, username: str = "") -> None:
        """Queue an incoming text message from a user in a private chat."""
        self._add_message(chat_id, user_id, username, text=text)

    def add_document(
        self, chat_id: int, user_id: int, data: bytes, file_name: str, caption: str = "",
        file_size: int | None = None,
    ) -> str:  # fmt: skip
        """Queue a document message (``file_size`` defaults to the real size); returns its file_id."""
        file_id = self.files.put(data)
        document = {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_name": file_name,
                    "file_size": len(data) if file_size is None else file_size}  # fmt: skip
        self._add_message(chat_id, user_id, caption=caption, document=document)
        return file_id

    def add_photo(self, chat_id: int, user_id: int, data: bytes, caption: str = "") -> str:
        """Queue a photo: a bogus 90x90 thumbnail, then ``data`` as the 800x600 size; returns the big id."""
        sizes = []
        for blob, side in ((b"thumbnail, not an image", 90), (data, 800)):
            file_id = self.files.put(blob)
            sizes.append({"file_id": file_id, "file_unique_id": f"u{file_id}", "width": side,
                          "height": side * 3 // 4, "file_size": len(blob)})  # fmt: skip
        self._add_message(chat_id, user_id, caption=caption, photo=sizes)
        return str(sizes[-1]["file_id"])

    def _add_message(
        self, chat_id: int, user_id: int, username: str = "", caption: str = "", **fields: Any
    ) -> None:
        sender: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": "Test"}
        if username:
            sender["username"] = username
        if caption:
            fields["caption"] = caption
        message = {"message_id": len(self.updates) + 1, "from": sender,
                   "chat": {"id": chat_id, "type": "private"}, "date": 0, **fields}  # fmt: skip
        self.updates.append({"update_id": 1000 + len(self.updates), "message": message})

    async def handled(self) -> None:
        """Wait until the bot has confirmed (via the next getUpdates offset) every update so far."""
        last = self.updates[-1]["update_id"]
        await self.until(lambda: self.confirmed_offset > last)

    async def push_text(self, chat_id: int, user_id: int, text: str, username: str = "") -> None:
        """``add_text`` and wake a waiting ``getUpdates``."""
        self.add_text(chat_id, user_id, text, username)
        await self.changed()

    def texts(self, chat_id: int | str) -> list[str]:
        """The visible text of every message delivered to ``chat_id``, in order."""
        return [m["visible"] for m in self.sent if str(m["chat_id"]) == str(chat_id)]

    @staticmethod
    def _error(status: int, description: str, retry_after: float | None = None) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())

    async def _handle(self, request: web.Request) -> web.Response:
        if self.redirect_loop:
            raise web.HTTPFound(request.path)
        if request.match_info["token"] != self.token:
            return self._error(401, "Unauthorized")
        method = request.match_info["method"]
        payload = orjson.loads(await request.read() or b"{}")
        if method == "getMe":
            return await self._get_me()
        if method == "getUpdates":
            return await self._get_updates(request, payload)
        if method in ("setWebhook", "deleteWebhook"):
            return await self._set_webhook(method, payload)
        if method == "sendMessage":
            return await self._send_message(payload)
        if method == "getFile":
            return await self._get_file(str(payload.get("file_id", "")))
        return self._error(404, "Not Found: method not found")

    async def _get_me(self) -> web.Response:
        self.get_me_calls += 1
        await self.changed()
        if self.get_me_failures:
            failure = self.get_me_failures.popleft()
            return self._error(failure.status, failure.description, failure.retry_after)
        if self.get_me_gate is not None:
            await self.get_me_gate.wait()
        return web.json_response(
            {"ok": True, "result": {"id": 123456, "is_bot": True, "username": "fake_bot"}}
        )

    async def _get_file(self, file_id: str) -> web.Response:
        self.get_file_calls.append(file_id)
        await self.changed()
        if file_id not in self.files.blobs:
            return self._error(400, "Bad Request: invalid file_id")
        size = len(self.files.blobs[file_id])
        result = {"file_id": file_id, "file_size": size, "file_path": f"documents/{file_id}"}
        return web.json_response({"ok": True, "result": result})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return self._error(401, "Unauthorized")
        return await self.files.serve(request, request.match_info["path"].rsplit("/", 1)[-1], self)

    async def _get_updates(self, request: web.Request, payload: dict[str, Any]) -> web.Response:
        self.get_updates_calls += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.pollers.append(tuple(peer[:2]) if peer else ("?", 0))
        if self.webhook is not None:
            await self.changed()
            return self._error(409, "Conflict: can't use getUpdates method while webhook is active; "
                                    "use deleteWebhook to delete the webhook first")  # fmt: skip
        offset = int(payload.get("offset", 0))
        if not self.freeze_confirmations:
            self.confirmed_offset = max(self.confirmed_offset, offset)
        for task, other in list(self._polls.items()):  # one consumer: a newer poll ends the older one
            if other.transport is not None and not other.transport.is_closing():
                self.conflicts += 1
                task.cancel()
        await self.changed()
        start = max(offset, self.confirmed_offset)

        def fresh() -> list[dict[str, Any]]:
            return [u for u in self.updates if u["update_id"] >= start]

        me = asyncio.current_task()
        assert me is not None
        self._polls[me] = request
        try:
            wait = float(payload.get("timeout", 0))
            with contextlib.suppress(TimeoutError):
                await self.until(lambda: bool(fresh()) or self._closing, within=wait)
        except asyncio.CancelledError:
            if request.transport is None or request.transport.is_closing():
                raise  # (the client went away)
            return self._error(409, "Conflict: terminated by other getUpdates request; "
                                    "make sure that only one bot instance is running")  # fmt: skip
        finally:
            del self._polls[me]
        return web.json_response({"ok": True, "result": fresh()})

    async def _set_webhook(self, method: str, payload: dict[str, Any]) -> web.Response:
        self.webhook_calls.append((method, payload))
        if method == "setWebhook":
            if not str(payload.get("url", "")).startswith("https://"):
                return self._error(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
            self.webhook = payload
        else:
            self.webhook = None
        await self.changed()
        return web.json_response({"ok": True, "result": True})

    async def _send_message(self, payload: dict[str, Any]) -> web.Response:
        self.send_calls += 1
        self.send_times.append(asyncio.get_running_loop().time())
        await self.changed()
        if self.hold_after is not None and len(self.sent) >= self.hold_after and not self.release.is_set():
            self.parked += 1
            await self.changed()
            await self.release.wait()  # a dying client cancels this handler: nothing is recorded
        if self.send_delay:
            await asyncio.sleep(self.send_delay)
        if self.failures:
            failure = self.failures.popleft()
            return self._error(failure.status, failure.description, failure.retry_after)
        if self.rate_limit_every and self.send_calls % self.rate_limit_every == 0:
            wait = self.rate_limit_retry_after
            return self._error(429, f"Too Many Requests: retry after {wait}", wait)
        text = str(payload.get("text", ""))
        if not text.strip():
            return self._error(400, "Bad Request: message text is empty")
        visible = text
        if payload.get("parse_mode") == "HTML":
            try:
                visible = telegram_visible_text(text)
            except ValueError as exc:
                return self._error(400, f"Bad Request: can't parse entities: {exc}")
        if len(visible.encode("utf-16-le")) // 2 > 4096:
            return self._error(400, "Bad Request: message is too long")
        self.sent.append({**payload, "visible": visible, "message_id": next(self._message_ids)})
        await self.changed()
        return web.json_response({"ok": True, "result": {"message_id": self.sent[-1]["message_id"]}})


# --------------------------------------------------------------------------- Discord


class FakeDiscord(Recorder):
    """Discord's REST API (users/@me, channel messages) and Gateway websocket."""

    def __init__(self, token: str = DISCORD_TOKEN) -> None:
        super().__init__()
        self.token = token
        self.messages: list[dict[str, Any]] = []  # created messages, in order
        self.post_calls = 0
        self.post_times: list[float] = []
        self.failures: deque[Failure] = deque()
        self.me_failures: deque[Failure] = deque()  # answers for the next /users/@me calls
        self.lose_responses = 0  # create the next N messages, then answer 502 as if the response was lost
        self.heartbeat_interval_ms = 45_000
        self.ack_heartbeats = True
        self.identifies: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.heartbeats: list[int | None] = []
        self.session_id = "fake-session-1"
        self.ended_sessions: list[str] = []  # closed by the client with 1000/1001: not resumable
        self.events: list[dict[str, Any]] = []  # every dispatch sent, for replay on RESUME
        self.ws: web.WebSocketResponse | None = None
        self.connections = 0  # Gateway websockets open now
        self.most_connections = 0  # the most ever open at once (one session per shard: 1)
        self.gateway_url = ""  # set by the test once the server runs: where RESUME goes
        self.files = FileShelf()  # attachments, served at /attachments/<name> on this origin
        self._nonces: dict[tuple[str, str], dict[str, Any]] = {}
        self._ids = itertools.count(5000)
        self.app = web.Application()
        self.app.router.add_get("/attachments/{name}", self._attachment)
        self.app.router.add_get("/api/users/@me", self._me)
        self.app.router.add_post("/api/channels/{channel_id}/messages", self._post)
        self.app.router.add_get("/gateway", self._gateway)

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bot {self.token}"

    async def _me(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        if self.me_failures:
            f = self.me_failures.popleft()
            return web.json_response({"message": f.description, "code": 0}, status=f.status)
        return web.json_response({"id": DISCORD_BOT_ID, "username": "fakebot", "bot": True})

    async def _post(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        self.post_calls += 1
        self.post_times.append(asyncio.get_running_loop().time())
        await self.changed()
        if self.failures:
            f = self.failures.popleft()
            body: dict[str, Any] = {"message": f.description, "code": 0}
            if f.retry_after is not None:
                body |= {"retry_after": f.retry_after, "global": False}
            return web.json_response(body, status=f.status, headers=f.headers)
        payload = orjson.loads(await request.read())
        channel_id = request.match_info["channel_id"]
        nonce = payload.get("nonce")
        if payload.get("enforce_nonce") and nonce and (channel_id, nonce) in self._nonces:
            return web.json_response(self._nonces[(channel_id, nonce)])
        message = {"id": str(next(self._ids)), "channel_id": channel_id, "content": payload["content"],
                   "nonce": nonce}  # fmt: skip
        self.messages.append(message)
        if nonce:
            self._nonces[(channel_id, nonce)] = message
        await self.changed()
        if self.lose_responses:
            self.lose_responses -= 1
            return web.json_response({"message": "Bad Gateway", "code": 0}, status=502)
        return web.json_response(message)

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        return await self.files.serve(request, request.match_info["name"], self)

    def attachment(self, root: str, name: str, data: bytes, size: int | None = None) -> dict[str, Any]:
        """Store ``data`` as an attachment served under ``root`` (a URL); returns its message object."""
        self.files.put(data, name)
        url = f"{root}/attachments/{name}"
        return {"id": str(next(self._ids)), "filename": name, "size": len(data) if size is None else size,
                "url": url, "proxy_url": url}  # fmt: skip

    def contents(self, channel_id: str) -> list[str]:
        """Every message created in ``channel_id``, in order."""
        return [m["content"] for m in self.messages if m["channel_id"] == channel_id]

    async def dispatch_message(
        self,
        channel_id: str,
        content: str,
        author_id: str = "42",
        username: str = "alice",
        bot: bool = False,
        attachments: list[dict[str, Any]] | None = None,
    ) -> None:
        """Send a MESSAGE_CREATE (queued for replay if nobody is connected)."""
        author = {"id": author_id, "username": username, "bot": bot}
        data = {"id": str(next(self._ids)), "channel_id": channel_id, "content": content, "author": author,
                "attachments": attachments or []}  # fmt: skip
        await self._send_event("MESSAGE_CREATE", data)

    async def send_op(self, op: int, data: object = None) -> None:
        """Send a control frame (7 RECONNECT, 9 INVALID SESSION, 1 HEARTBEAT request)."""
        if self.ws is not None:
            await self.ws.send_str(orjson.dumps({"op": op, "d": data}).decode())

    async def drop(self) -> None:
        """Close the Gateway connection the way a network failure would (the session stays resumable)."""
        if self.ws is not None:
            await self.ws.close(code=4000, message=b"dropped by test")

    async def _send_event(self, name: str, data: dict[str, Any]) -> None:
        event = {"op": 0, "t": name, "s": len(self.events) + 1, "d": data}
        self.events.append(event)
        if self.ws is not None and not self.ws.closed:
            # (a peer that died without a word: not delivered, kept for replay like any other)
            with contextlib.suppress(ConnectionResetError):
                await self.ws.send_str(orjson.dumps(event).decode())

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.connections += 1
        self.most_connections = max(self.most_connections, self.connections)
        try:
            return await self._session(ws)
        finally:
            self.connections -= 1
            await self.changed()

    async def _session(self, ws: web.WebSocketResponse) -> web.WebSocketResponse:
        await ws.send_str(
            orjson.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}}).decode()
        )
        client_close = None  # the code of a close the client started
        while True:
            frame = await ws.receive()
            if frame.type == WSMsgType.CLOSE:
                client_close = frame.data
                break
            if frame.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
            if frame.type != WSMsgType.TEXT and frame.type != WSMsgType.BINARY:
                continue
            payload = orjson.loads(frame.data)
            op = payload.get("op")
            if op == 1:
                self.heartbeats.append(payload.get("d"))
                if self.ack_heartbeats:
                    await ws.send_str(orjson.dumps({"op": 11}).decode())
            elif op == 2:
                await self._identify(ws, payload["d"])
            elif op == 6:
                await self._resume(ws, payload["d"])
            await self.changed()
        if client_close in (1000, 1001) and self.ws is ws:  # (as Discord: a clean close ends the session)
            self.ended_sessions.append(self.session_id)
            self.session_id = f"fake-session-{len(self.ended_sessions) + 1}"
        if self.ws is ws:
            self.ws = None
        await self.changed()
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        self.identifies.append(data)
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        self.ws = ws
        ready = {"v": 10, "session_id": self.session_id, "resume_gateway_url": self.gateway_url,
                 "user": {"id": DISCORD_BOT_ID, "username": "fakebot", "bot": True}}  # fmt: skip
        await self._send_event("READY", ready)

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        self.resumes.append(data)
        if data.get("session_id") != self.session_id or data.get("token") != self.token:
            await ws.send_str(orjson.dumps({"op": 9, "d": False}).decode())
            return
        self.ws = ws
        for event in self.events:
            if event["s"] > (data.get("seq") or 0):
                await ws.send_str(orjson.dumps(event).decode())
        await self._send_event("RESUMED", {})


# --------------------------------------------------------------------------- wiring


def telegram_section(url: str, allow_from: list[str] | None = None) -> dict[str, Any]:
    """``channels.telegram`` pointing at a fake Bot API at ``url``."""
    allow = allow_from if allow_from is not None else ["*"]
    return {"enabled": True, "token": TELEGRAM_TOKEN, "apiBase": url, "allowFrom": allow, "pollTimeout": 1}


def discord_section(url: str, allow_from: list[str] | None = None) -> dict[str, Any]:
    """``channels.discord`` pointing at a fake Discord whose root is ``url``."""
    allow = allow_from if allow_from is not None else ["*"]
    gateway = f"{url}/gateway?v=10&encoding=json"
    return {"enabled": True, "token": DISCORD_TOKEN, "apiBase": f"{url}/api", "gatewayUrl": gateway,
            "allowFrom": allow}  # fmt: skip


def make_config(
    workspace: Path,
    telegram: str | None = None,
    discord: str | None = None,
    allow_from: list[str] | None = None,
    **channels: Any,
) -> Config:
    """A Config with the outbox under ``workspace`` and channels pointed at fake servers."""
    section: dict[str, Any] = {"retryBaseSeconds": 0.001, "retryMaxSeconds": 0.01, **channels}
    if telegram is not None:
        section["telegram"] = telegram_section(telegram, allow_from)
    if discord is not None:
        section["discord"] = discord_section(discord, allow_from)
    return parse_config({"agents": {"defaults": {"workspace": str(workspace)}}, "channels": section})


@contextlib.asynccontextmanager
async def running(
    config: Config, bus: MessageBus | None = None, outbox: tuple[Outbox, LaneOwnership] | None = None
) -> AsyncIterator[ChannelManager]:
    """Build, start and run a ChannelManager the way runtime.py does (on ``outbox`` and its lane
    ownership when given: another backend's); stop it on exit."""
    bus = bus if bus is not None else MessageBus()
    manager = build_channel_manager(config, bus, ApiChannel())
    if outbox is not None:
        manager.use_outbox(*outbox)
    await manager.start()
    task = asyncio.create_task(manager.run())
    try:
        yield manager
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await manager.stop()


async def start_serve(config_path: Path, log_path: Path) -> asyncio.subprocess.Process:
    """Start `nanobot serve -c CONFIG_PATH` as a real process, its output appended to ``log_path``."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nanobot", "serve", "-c", str(config_path), stdout=log, stderr=log, env=env
        )


def outbox_entries(config: Config) -> list[tuple[int, State, str]]:
    """(id, state, content) of every entry of the workspace's SQLite outbox."""
    conn = connect(config.agents.defaults.workspace_path / "outbox.db")
    try:
        return [(e.id, e.state, e.content) for e in select(conn)]
    finally:
        conn.close()
