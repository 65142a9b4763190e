"""The ``api`` channel: routes the agent's output back to the HTTP request waiting for it.

Each waiting request has one :class:`Reply`: the text the agent has said and the request
has not yet written, coalesced into one pending list, and how the turn ended. A slow
stream reader does not make that list grow without bound: past :data:`STREAM_BOUND`
characters, :meth:`ApiChannel.wait_writable` hands the agent an awaitable that resolves
once the request has taken the text, so the upstream read pauses (back-pressure).

The channel also admits requests (``api.maxConcurrentTurns``) and, on shutdown, refuses
new ones and ends the ones still running after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nanobot.bus import OutboundKind, OutboundMessage
from nanobot.channels.base import Channel
from nanobot.errors import NanobotError, RateLimitError, ServiceUnavailableError

# Characters of answer text one stream may hold before the agent waits for its reader.
STREAM_BOUND = 256 * 1024


class Reply:
    """What the agent has said to one waiting request and the request has not yet taken."""

    __slots__ = (
        "_chars",
        "_loop",
        "_room",
        "_turn_task",
        "_waiter",
        "end",
        "events",
        "keepalive_due",
        "pieces",
        "refused",
        "stream",
        "tool_events",
        "turn",
    )

    def __init__(
        self, stream: bool, loop: asyncio.AbstractEventLoop, tool_events: bool = False, turn: str = ""
    ) -> None:
        self._loop = loop
        self.turn = turn  # the request id of the turn it waits for
        self.stream = stream
        self.tool_events = stream and tool_events  # the request asked for tool progress events
        self.pieces: list[str] = []  # text not yet taken, oldest first
        # tool progress events not yet taken, each with len(pieces) when it came (its place in the text)
        self.events: list[tuple[int, dict[str, str]]] = []
        self._chars = 0
        self.end: OutboundMessage | None = None  # the REPLY or ERROR that ends the turn
        self.refused: NanobotError | None = None  # ended by the server (shutdown), not by the turn
        self.keepalive_due = False
        self._waiter: asyncio.Future[None] | None = None  # the request, waiting for output
        self._room: asyncio.Future[None] | None = None  # the agent, waiting for the reader
        self._turn_task: asyncio.Task[Any] | None = None  # the request's task, when the turn runs in it

    def put(self, msg: OutboundMessage) -> None:
        """Take one message from the agent (never blocks)."""
        kind = msg.kind
        if kind is OutboundKind.DELTA:
            self.pieces.append(msg.content)
            self._chars += len(msg.content)
        elif kind is OutboundKind.MESSAGE:  # a `message`-tool text for this very chat
            text = msg.content + "\n\n" if self.stream else msg.content
            self.pieces.append(text)
            self._chars += len(text)
        elif kind is OutboundKind.TOOL_PROGRESS:
            if not self.tool_events:
                return  # not asked for: the stream stays exactly OpenAI's
            self.events.append((len(self.pieces), msg.metadata))
        elif self.end is None:
            self.end = msg
        self._wake()

    def refuse(self, error: NanobotError) -> None:
        """End the request with ``error`` although its turn has not ended."""
        if self.end is None and self.refused is None:
            self.refused = error
            self._wake()
            if self._turn_task is not None:  # the turn runs in the request's task: stop it there
                self._turn_task.cancel()

    def turn_runs_here(self) -> asyncio.Task[Any]:
        """The turn runs in the calling task, the request's (``MessageBus.run_inbound``): a
        refusal cancels that task, and the request answers with the refusal. Returns the task."""
        task = asyncio.current_task(self._loop)
        assert task is not None  # (called from a request handler)
        self._turn_task = task
        return task

    def ask_keepalive(self) -> None:
        """The stream has been quiet: ask the request to write a keep-alive comment."""
        self.keepalive_due = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _ready(self) -> bool:
        if self.end is not None or self.refused is not None:
            return True
        # A stream writes text and keep-alives as they come; a JSON answer waits for the end.
        return self.stream and (bool(self.pieces) or bool(self.events) or self.keepalive_due)

    def answered(self) -> bool:
        """Whether the turn has ended (or the request was refused): nothing more will come."""
        return self.end is not None or self.refused is not None

    async def wait(self) -> None:
        """Wait until there is something to write: text or a keep-alive (streams), or the end."""
        while not self._ready():
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take_events(self) -> list[tuple[int, dict[str, str]]]:
        """The pending tool events with their places in the pending text; call before :meth:`take`."""
        events = self.events
        self.events = []
        return events

    def take(self) -> list[str]:
        """The pending text, oldest first; the agent may go on producing."""
        pieces = self.pieces
        self.pieces = []
        self._chars = 0
        self._free()
        return pieces

    def room(self) -> asyncio.Future[None] | None:
        """None while under the bound (the common case); else a future set once text is taken."""
        if self._chars <= STREAM_BOUND:
            return None
        if self._room is None:
            self._room = self._loop.create_future()
        return self._room

    def _free(self) -> None:
        room = self._room
        if room is not None:
            self._room = None
            if not room.done():
                room.set_result(None)

    def close(self) -> None:
        """The request is gone: release a waiting agent (its turn is being cancelled)."""
        self._free()


def _cut_short() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "the server is shutting down and could not finish this request; retry it", retry_after=1.0
    )


class ApiChannel(Channel):
    """Holds one :class:`Reply` per in-flight HTTP request, keyed by its turn id."""

    name = "api"
    durable = False

    def __init__(self, max_turns: int = 1024) -> None:
        self._waiting: dict[str, Reply] = {}
        self._max_turns = max_turns
        self._admitted = 0
        self._drained: asyncio.Event | None = None  # set once shutting down
        self._ended = False  # set once the grace has run out
        self._loop: asyncio.AbstractEventLoop | None = None  # learnt at the first request

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet finished."""
        return self._admitted

    @property
    def open_streams(self) -> int:
        """Streaming requests waiting on their turns (counted when /metrics is scraped)."""
        return sum(1 for reply in self._waiting.values() if reply.stream)

    async def start(self) -> None:
        """Nothing to start: the gateway's HTTP server is the receiving side."""

    async def stop(self) -> None:
        """Forget every waiting request."""
        for reply in self._waiting.values():
            reply.close()
        self._waiting.clear()

    def admit(self) -> None:
        """Count a new request in, or refuse it: too many turns running (429), or shutting down (503)."""
        if self._drained is not None:
            raise ServiceUnavailableError("the server is shutting down; retry in a moment", retry_after=1.0)
        if self._admitted >= self._max_turns:
            raise RateLimitError(
                f"too many requests are running ({self._max_turns}, api.maxConcurrentTurns); "
                "retry in a moment",
                retry_after=1.0,
            )
        self._admitted += 1

    def release(self) -> None:
        """Count an admitted request out."""
        self._admitted -= 1
        if not self._admitted and self._drained is not None:
            self._drained.set()

    async def drain(self, grace: float) -> int:
        """Refuse new requests, give running ones ``grace`` seconds, then end the rest with a 503.

        Returns how many requests were still running when the grace ran out.
        """
        drained = self._drained = asyncio.Event()
        if not self._admitted:
            return 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await drained.wait()
                return 0
        self._ended = True  # a request admitted before, still reading its body, is refused too
        for reply in self._waiting.values():
            reply.refuse(_cut_short())
        return self._admitted

    def open(self, request_id: str, stream: bool = False, tool_events: bool = False) -> Reply:
        """Register a request; the agent's output for it collects in the returned :class:`Reply`."""
        if self._ended:
            raise _cut_short()
        loop = self._loop
        if loop is None:  # (each get_running_loop() is a getpid() system call: once is enough)
            loop = self._loop = asyncio.get_running_loop()
        reply = self._waiting[request_id] = Reply(stream, loop, tool_events, request_id)
        return reply

    def close(self, request_id: str) -> None:
        """Unregister a finished request; later output for it is dropped."""
        reply = self._waiting.pop(request_id, None)
        if reply is not None:
            reply.close()

    def wait_writable(self, request_id: str) -> asyncio.Future[None] | None:
        """None when the request's stream has room; else a future that resolves once it has."""
        reply = self._waiting.get(request_id)
        return None if reply is None else reply.room()

    async def send(self, msg: OutboundMessage) -> None:
        """Route ``msg`` to the request it answers (dropped if that request is gone)."""
        self.deliver_nowait(msg)

    def deliver_nowait(self, msg: OutboundMessage) -> bool:
        """Route without awaiting; False when no request is waiting for it."""
        reply = self._waiting.get(msg.reply_to)
        if reply is None:
            return False
        reply.put(msg)
        return True
