"""A fake Telegram Bot API, served from the fake-upstream process (``bench.upstream --telegram``).

``getUpdates`` hands out queued updates (long-polling up to 1 s when none are queued);
``sendMessage`` is counted and recorded; any other method answers ``{"ok": true, "result": true}``.
Bench control: ``POST /bench/enqueue?n=N&chats=K`` queues N private text messages spread over
K chats, message i reading ``msg-<i> echo=1`` (the fake upstream then answers with that text);
``GET /bench/tgstats`` returns the counters and first/last send times; ``GET /bench/tgsent``
returns what was enqueued (marker -> chat) and every sendMessage as ``[chat_id, text]``, so the
benchmark can check each message was answered once, in its chat, with its text.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import orjson
from aiohttp import web


class FakeTelegram:
    """State of the fake Bot API."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.expected: dict[str, int] = {}  # marker text -> the chat it was sent from
        self.sends: list[tuple[object, str]] = []  # every sendMessage: (chat_id, text)
        self.next_id = 1
        self.new = asyncio.Event()
        self.sent = 0
        self.get_updates = 0
        self.t_enqueued = 0.0
        self.t_first_send = 0.0
        self.t_last_send = 0.0

    def enqueue(self, n: int, chats: int) -> None:
        """Queue ``n`` text messages from ``chats`` distinct private chats."""
        now = int(time.time())
        for i in range(n):
            chat = 1000 + i % max(1, chats)
            marker = f"msg-{len(self.expected):06d}"
            self.expected[marker] = chat
            self.updates.append(
                {
                    "update_id": self.next_id,
                    "message": {
                        "message_id": self.next_id,
                        "date": now,
                        "text": f"{marker} echo=1",
                        "from": {"id": chat, "is_bot": False, "first_name": "bench"},
                        "chat": {"id": chat, "type": "private", "first_name": "bench"},
                    },
                }
            )
            self.next_id += 1
        self.t_enqueued = time.perf_counter()
        self.new.set()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route one request."""
        path = request.path
        if path == "/bench/enqueue":
            self.enqueue(int(request.query.get("n", "1")), int(request.query.get("chats", "1")))
            return web.json_response({"ok": True})
        if path == "/bench/tgstats":
            return web.json_response(
                {
                    "sent": self.sent,
                    "get_updates": self.get_updates,
                    "queued": len(self.updates),
                    "t_enqueued": self.t_enqueued,
                    "t_first_send": self.t_first_send,
                    "t_last_send": self.t_last_send,
                }
            )
        if path == "/bench/tgsent":
            return web.json_response({"expected": self.expected, "sent": self.sends})
        method = path.rsplit("/", 1)[-1]
        params = await _params(request)
        if method == "getUpdates":
            return await self._get_updates(params)
        if method == "sendMessage":
            now = time.perf_counter()
            self.sent += 1
            self.sends.append((params.get("chat_id"), str(params.get("text", ""))))
            self.t_first_send = self.t_first_send or now
            self.t_last_send = now
            result = {
                "message_id": self.sent,
                "date": int(time.time()),
                "text": params.get("text", ""),
                "chat": {"id": params.get("chat_id"), "type": "private"},
            }
            return web.json_response({"ok": True, "result": result})
        if method == "getMe":
            return web.json_response(
                {
                    "ok": True,
                    "result": {"id": 123, "is_bot": True, "first_name": "bench", "username": "bench_bot"},
                }
            )
        return web.json_response({"ok": True, "result": True})

    async def _get_updates(self, params: dict[str, Any]) -> web.Response:
        self.get_updates += 1
        offset = int(params.get("offset") or 0)
        self.updates = [u for u in self.updates if u["update_id"] >= offset]
        if not self.updates:
            self.new.clear()
            wait = min(float(params.get("timeout") or 0), 1.0)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.new.wait(), wait)
        limit = int(params.get("limit") or 100)
        return web.json_response({"ok": True, "result": self.updates[:limit]})


async def _params(request: web.BaseRequest) -> dict[str, Any]:
    """Bot API parameters from the query string, a JSON body, or a form."""
    params: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        ctype = request.content_type
        if ctype == "application/json":
            body = orjson.loads(await request.read() or b"{}")
            if isinstance(body, dict):
                params.update(body)
        elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
    return params


async def start_fake_telegram(sock: socket.socket) -> web.ServerRunner:
    """Serve the fake Bot API on the listening ``sock``."""
    fake = FakeTelegram()
    runner = web.ServerRunner(web.Server(fake.handle, access_log=None), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
