"""The internal message bus: two asyncio queues and the messages that travel on them.

Channels publish :class:`InboundMessage` (someone said something); the agent consumes
them and publishes :class:`OutboundMessage` (deltas, replies, ``message``-tool sends),
which the channel manager dispatches to the named channel. The bus knows no channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from nanobot.valueclass import valueclass

if TYPE_CHECKING:
    from nanobot.errors import NanobotError


class InboundKind(StrEnum):
    """What an inbound message asks of the agent."""

    MESSAGE = "message"  # run a turn
    CANCEL = "cancel"  # cancel the running turn whose request_id matches


class OutboundKind(StrEnum):
    """What an outbound message carries."""

    DELTA = "delta"  # a piece of the answer, as the model produces it
    REPLY = "reply"  # the final answer of a turn
    MESSAGE = "message"  # text sent by the `message` tool
    ERROR = "error"  # the turn failed; ``error`` says why
    TOOL_PROGRESS = "tool_progress"  # a tool call started/finished/failed; ``metadata`` is the event


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An image for the model's vision input, already validated and base64-encoded."""

    name: str
    mime: str
    data_b64: str

    @property
    def data_url(self) -> str:
        """The image as a ``data:`` URL, the form OpenAI-compatible models accept."""
        return f"data:{self.mime};base64,{self.data_b64}"


@valueclass  # built several times per turn: see nanobot.valueclass
class Usage:
    """Token counts, summed over a turn's LLM calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
        )

    def as_dict(self) -> dict[str, int]:
        """The OpenAI ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@valueclass  # one per request: see nanobot.valueclass
class InboundMessage:
    """Something a user said on a channel, for the agent to answer.

    ``content`` is the user's text, with any documents' extracted text already appended;
    ``images`` go to the model for this turn only; ``instructions`` are extra system text
    for this turn only. ``request_id`` correlates the replies; ``stream`` asks for deltas.
    """

    channel: str
    chat_id: str
    content: str = ""
    sender_id: str = ""
    request_id: str = ""
    kind: InboundKind = InboundKind.MESSAGE
    stream: bool = False
    images: tuple[ImageInput, ...] = ()
    instructions: str = ""
    history_content: str | None = None  # what the history keeps, when it differs from content
    temperature: float | None = None  # this turn only; None: the configured default
    max_tokens: int | None = None  # this turn only; None: the configured default
    use_tools: bool = True  # False: this turn offers the model no tools (tool_choice "none")
    response_format: dict[str, Any] | None = None  # this turn only: passed to the upstream as given
    metadata: dict[str, str] = field(default_factory=dict)
    # The earlier messages, in OpenAI chat format, when the client sent the conversation
    # (api.clientHistory "accept"): the turn runs on them instead of the session's history
    # and stores nothing. None: the session's history.
    history: tuple[dict[str, Any], ...] | None = None

    @property
    def session_key(self) -> str:
        """The session this message belongs to: ``<channel>:<chat_id>``."""
        return f"{self.channel}:{self.chat_id}"


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """What happened to an outbound message on its first delivery attempt, for the `message` tool."""

    status: str  # "sent", "queued", "failed"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


@valueclass  # one per reply and per delta: see nanobot.valueclass
class OutboundMessage:
    """Something the agent says, addressed to ``channel``/``chat_id``.

    ``reply_to`` is the ``request_id`` of the inbound message it answers. ``receipt``,
    when set, is resolved by the channel manager once the first delivery attempt is done.
    """

    channel: str
    chat_id: str
    content: str = ""
    kind: OutboundKind = OutboundKind.REPLY
    reply_to: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    error: NanobotError | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    receipt: asyncio.Future[DeliveryReceipt] | None = field(default=None, compare=False, repr=False)


class MessageBus:
    """Two queues: inbound (channels → agent) and outbound (agent → channels).

    A consumer that only needs to *route* each message (never to await) may attach a
    handler instead of awaiting its queue: ``publish_*`` then calls it directly. That
    saves one task wake-up per message per direction — on the request hot path, two of
    the few things the gateway adds to every request. Messages queued before a handler
    is attached are handed to it first, so order holds.
    """

    __slots__ = ("_inbound", "_inbound_handler", "_inbound_runner", "_outbound", "_outbound_handler")

    def __init__(self) -> None:
        self._inbound: asyncio.Queue[InboundMessage] = asyncio.Queue()
        self._outbound: asyncio.Queue[OutboundMessage] = asyncio.Queue()
        self._inbound_handler: Callable[[InboundMessage], None] | None = None
        self._inbound_runner: Callable[[InboundMessage], Awaitable[None]] | None = None
        self._outbound_handler: Callable[[OutboundMessage], None] | None = None

    def attach_inbound(
        self,
        handler: Callable[[InboundMessage], None] | None,
        runner: Callable[[InboundMessage], Awaitable[None]] | None = None,
    ) -> None:
        """Route inbound messages to ``handler`` as they are published (None: back to the queue);
        ``runner``, when given, handles a message in its publisher's task (:meth:`run_inbound`)."""
        self._inbound_handler = handler
        self._inbound_runner = runner if handler is not None else None
        while handler is not None and not self._inbound.empty():
            handler(self._inbound.get_nowait())

    def run_inbound(self, msg: InboundMessage) -> Awaitable[None] | None:
        """Hand a message to the agent, for a publisher that waits for the answer anyway: with a
        runner attached, an awaitable that handles the message in the awaiting task (cancelling
        it cancels the turn); otherwise the message is published as by :meth:`publish_inbound`
        and this returns None. (Not a coroutine itself: one await level fewer on the hot path.)"""
        runner = self._inbound_runner
        if runner is None:
            self.publish_inbound(msg)
            return None
        return runner(msg)

    def attach_outbound(self, handler: Callable[[OutboundMessage], None] | None) -> None:
        """Route outbound messages to ``handler`` as they are published (None: back to the queue)."""
        self._outbound_handler = handler
        while handler is not None and not self._outbound.empty():
            handler(self._outbound.get_nowait())

    def publish_inbound(self, msg: InboundMessage) -> None:
        """Hand a message to the agent (never blocks: the queue is unbounded)."""
        handler = self._inbound_handler
        if handler is not None:
            handler(msg)
        else:
            self._inbound.put_nowait(msg)

    async def consume_inbound(self) -> InboundMessage:
        """Wait for the next inbound message."""
        return await self._inbound.get()

    def publish_outbound(self, msg: OutboundMessage) -> None:
        """Hand a message to the channels (never blocks: the queue is unbounded)."""
        handler = self._outbound_handler
        if handler is not None:
            handler(msg)
        else:
            self._outbound.put_nowait(msg)

    async def consume_outbound(self) -> OutboundMessage:
        """Wait for the next outbound message."""
        return await self._outbound.get()

    def drain_outbound(self) -> list[OutboundMessage]:
        """Take every outbound message already queued, without waiting."""
        out: list[OutboundMessage] = []
        q = self._outbound
        while not q.empty():
            out.append(q.get_nowait())
        return out
