"""The ``api`` channel: routes the agent's output back to the HTTP request waiting for it."""

from __future__ import annotations

import asyncio

from nanobot.bus import OutboundMessage
from nanobot.channels.base import Channel


class ApiChannel(Channel):
    """Holds one queue per in-flight HTTP request, keyed by its request id."""

    name = "api"
    durable = False

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Queue[OutboundMessage]] = {}

    async def start(self) -> None:
        """Nothing to start: the gateway's HTTP server is the receiving side."""

    async def stop(self) -> None:
        """Forget every waiting request."""
        self._waiting.clear()

    def open(self, request_id: str) -> asyncio.Queue[OutboundMessage]:
        """Register a request; the agent's output for it arrives on the returned queue."""
        queue: asyncio.Queue[OutboundMessage] = asyncio.Queue()
        self._waiting[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        """Unregister a finished request; later output for it is dropped."""
        self._waiting.pop(request_id, None)

    async def send(self, msg: OutboundMessage) -> None:
        """Route ``msg`` to the request it answers (dropped if that request is gone)."""
        self.deliver_nowait(msg)

    def deliver_nowait(self, msg: OutboundMessage) -> bool:
        """Route without awaiting; False when no request is waiting for it."""
        queue = self._waiting.get(msg.reply_to)
        if queue is None:
            return False
        queue.put_nowait(msg)
        return True
