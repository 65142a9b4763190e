"""The agent loop: consumes the bus, runs one task per turn, publishes what it says.

A turn whose caller waits for its answer anyway (a non-streaming API request) runs in the
caller's task instead (:meth:`AgentLoop.serve`), with the same deadline and cancellation.

A turn is: system prompt + bounded session history + the new user message → the
provider, with the registered tools; tool calls run and the loop repeats until a final
answer or ``maxToolIterations``; then the whole turn is persisted at once. Turns on one
session never interleave (the session lock); different sessions run concurrently. A
cancelled or failed turn persists nothing, so the history is as if it never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from nanobot.agent.prompt import Prompt, images_message, too_long, user_message
from nanobot.bus import InboundKind, InboundMessage, MessageBus, OutboundKind, OutboundMessage, Usage
from nanobot.config import AgentDefaults
from nanobot.errors import (
    ContextLengthError,
    NanobotError,
    ProviderError,
    ProviderTimeoutError,
    TurnTimeoutError,
)
from nanobot.metrics import Metrics
from nanobot.providers.base import LLMResponse
from nanobot.providers.openai_compat import OpenAICompatProvider
from nanobot.providers.sse import DeltaCallback
from nanobot.storage.sessions import ChatMessage, SessionStore
from nanobot.tools import ToolContext, ToolRegistry, ToolResult

log = logging.getLogger(__name__)
_NO_TOOLS = ToolResult("Error: no tools are available in this turn (tool_choice none)", is_error=True)


class StreamPressure(Protocol):
    """Back-pressure from whoever relays a turn's deltas to a reader (the ``api`` channel)."""

    def wait_writable(self, request_id: str) -> Awaitable[None] | None:
        """None when the reader of ``request_id`` keeps up; else an awaitable to wait on first."""
        ...


class AgentLoop:
    """Turns inbound messages into answers, one asyncio task per turn (or the caller's: :meth:`serve`)."""

    def __init__(
        self,
        bus: MessageBus,
        provider: OpenAICompatProvider,
        sessions: SessionStore,
        tools: ToolRegistry,
        defaults: AgentDefaults,
        *,
        turn_timeout: float,
        pressure: StreamPressure | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._bus = bus
        self._provider = provider
        self._sessions = sessions
        self._tools = tools
        self._defaults = defaults
        self._turn_timeout = turn_timeout
        self._system: ChatMessage = {"role": "system", "content": defaults.system_prompt}
        self._running: dict[str, asyncio.Task[Any]] = {}  # the tasks running turns, by request id
        self._expired: set[asyncio.Task[Any]] = set()  # turns cancelled by their deadline
        self._pressure = pressure
        self._event_loop: asyncio.AbstractEventLoop | None = None  # learnt when run() starts
        self._metrics = metrics or Metrics()

    @property
    def running(self) -> int:
        """Turns running now (read when /metrics is scraped)."""
        return len(self._running)

    async def run(self) -> None:
        """Take inbound messages until cancelled; on cancellation every running turn is cancelled too.

        Each message is routed as it is published (a turn task, or a cancellation): the bus
        calls :meth:`route` directly, so no task sits between a request and its turn; a caller
        that waits for the answer anyway has the turn run in its own task (:meth:`serve`).
        """
        self._event_loop = asyncio.get_running_loop()  # (each get_running_loop() is a getpid() call)
        self._bus.attach_inbound(self.route, self.serve)
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._bus.attach_inbound(None)
            tasks = list(self._running.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def route(self, msg: InboundMessage) -> None:
        """Start a turn for ``msg``, or cancel the turn it names."""
        if msg.kind is InboundKind.CANCEL:
            task = self._running.get(msg.request_id)
            if task is not None:
                task.cancel()
            return
        self._start_turn(msg)

    def _start_turn(self, msg: InboundMessage) -> None:
        # The deadline is one timer handle, not an asyncio.timeout() per turn: on the hot path
        # that context manager (its object, current_task lookups, rescheduling) cost as much
        # as the rest of the turn's bookkeeping.
        loop = self._event_loop or asyncio.get_running_loop()
        task = loop.create_task(self._turn(msg))
        key = msg.request_id or f"task-{id(task)}"
        self._running[key] = task
        deadline = loop.call_later(self._turn_timeout, self._expire, task)

        def done(_t: object) -> None:
            deadline.cancel()
            self._running.pop(key, None)
            self._expired.discard(task)

        task.add_done_callback(done)

    def serve(self, msg: InboundMessage) -> Awaitable[None]:
        """Run ``msg``'s turn in the awaiting task; done once it is answered (or has failed).

        For a caller that waits for the answer anyway (a non-streaming API request): no task of
        the turn's own and no wake-up between the turn and its caller, about 30k instructions
        per request. The turn behaves as in its own task: cancelling the caller cancels it, its
        deadline cancels the caller's task and answers with a timeout, it counts as running.
        (A plain function: the turn's coroutine is the only await level.)
        """
        return self._turn(msg, here=True)

    def _expire(self, task: asyncio.Task[Any]) -> None:
        self._expired.add(task)
        task.cancel()

    async def _turn(self, msg: InboundMessage, here: bool = False) -> None:
        """One turn, answered or failed; ``here``: in the awaiting task (:meth:`serve`), which is
        registered and given the deadline here (a turn task gets them in :meth:`_start_turn`)."""
        deadline: asyncio.TimerHandle | None = None
        if here:
            if msg.kind is InboundKind.CANCEL:
                self.route(msg)
                return
            loop = self._event_loop or asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            assert task is not None  # (a coroutine awaited on a running loop runs in a task)
            key = msg.request_id or f"task-{id(task)}"
            self._running[key] = task
            deadline = loop.call_later(self._turn_timeout, self._expire, task)
        started = time.monotonic()
        try:
            await self.run_turn(msg)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # Our own deadline, and nobody else cancelled the turn too: answer with a timeout.
            if task in self._expired and task is not None and task.uncancel() == 0:
                self._timed_out(msg)
                return
            raise
        except TimeoutError:
            self._timed_out(msg)
        except NanobotError as exc:
            self._fail(msg, exc)
        except Exception:  # a bug must answer the user and be logged, never kill the loop
            log.exception("turn on %s failed", msg.session_key)
            self._fail(msg, NanobotError("internal error while answering"))
        finally:
            if deadline is not None:
                deadline.cancel()
                self._running.pop(key, None)
                self._expired.discard(task)
        # Answered or failed; a cancelled turn (its client left) is not a duration worth counting.
        self._metrics.turn(msg.channel, time.monotonic() - started)

    def _timed_out(self, msg: InboundMessage) -> None:
        self._fail(msg, TurnTimeoutError(f"the request took longer than {self._turn_timeout:g} s"))

    def _fail(self, msg: InboundMessage, error: NanobotError) -> None:
        log.warning("turn on %s failed: %s", msg.session_key, error.message)
        self._bus.publish_outbound(
            OutboundMessage(
                msg.channel, msg.chat_id, kind=OutboundKind.ERROR, reply_to=msg.request_id, error=error
            )
        )

    def _context(self, msg: InboundMessage) -> list[ChatMessage]:
        if not msg.instructions:
            return [self._system]
        return [{"role": "system", "content": f"{self._defaults.system_prompt}\n\n{msg.instructions}"}]

    async def run_turn(self, msg: InboundMessage) -> None:
        """Run one turn under the session lock and publish its answer."""
        key = msg.session_key
        bus = self._bus
        on_delta = None
        pressure = self._pressure
        if msg.stream:

            def on_delta(piece: str) -> Awaitable[None] | None:
                bus.publish_outbound(
                    OutboundMessage(msg.channel, msg.chat_id, piece, OutboundKind.DELTA, msg.request_id)
                )
                # a slow reader pauses the upstream read here (one lookup per delta otherwise)
                return None if pressure is None else pressure.wait_writable(msg.request_id)

        # A conversation the client sent (api.clientHistory "accept") is the history as it
        # stands: no session to serialise on, nothing stored.
        given = msg.history
        async with self._sessions.lock(key) if given is None else contextlib.nullcontext():
            history = await self._sessions.history(key) if given is None else list(given)
            live_user, stored_user = user_message(msg)
            context = self._context(msg)
            prompt = Prompt([*context, *history, live_user], len(context), len(context) + len(history))
            new: list[ChatMessage] = [stored_user]
            answer, finish, usage = await self._loop(msg, prompt, new, on_delta)
            new.append({"role": "assistant", "content": answer})
            if given is None:
                await self._sessions.append_turn(key, new)
        # Positional: a class called with keywords builds a dict of them (~450 instructions each).
        reply = OutboundKind.REPLY
        bus.publish_outbound(
            OutboundMessage(msg.channel, msg.chat_id, answer, reply, msg.request_id, usage, finish)
        )

    async def _loop(
        self, msg: InboundMessage, prompt: Prompt, new: list[ChatMessage], on_delta: DeltaCallback | None
    ) -> tuple[str, str, Usage]:
        """Call the model and run its tools until it answers; returns (answer, finish_reason, usage)."""
        ctx: ToolContext | None = None  # built at the first tool call: most turns make none
        messages = prompt.messages
        usage: Usage | None = None
        limit = self._defaults.max_tool_iterations
        for i in range(limit):
            resp = await self._ask(msg, prompt, on_delta)
            usage = resp.usage if usage is None else usage + resp.usage
            if not resp.tool_calls:
                if i == 0 and not resp.content:
                    raise ProviderError(
                        f"the upstream LLM returned an empty answer (no text and no tool calls; "
                        f"finish_reason {resp.finish_reason})"
                    )
                return resp.content, resp.finish_reason, usage
            if resp.content:
                await self._said_before_tools(msg, resp.content, on_delta)
            call_msg: ChatMessage = {
                "role": "assistant",
                "content": resp.content or None,
                "tool_calls": [tc.as_dict() for tc in resp.tool_calls],
            }
            messages.append(call_msg)
            new.append(call_msg)
            images: list[tuple[str, ToolResult]] = []
            if ctx is None:
                ctx = ToolContext(self._bus, msg.channel, msg.chat_id, msg.request_id)
            for call in resp.tool_calls:
                result = await self._tools.execute(call, ctx) if msg.use_tools else _NO_TOOLS
                tool_msg: ChatMessage = {"role": "tool", "tool_call_id": call.id, "content": result.text}
                messages.append(tool_msg)
                new.append(tool_msg)
                if result.images:
                    images.append((call.name, result))
            if images:  # after every tool message: a tool message cannot carry images, nor be split
                live, stored = images_message(images)
                messages.append(live)
                new.append(stored)
        answer = f"(stopped after {limit} tool iterations without a final answer)"
        if on_delta is not None:
            await _relay(on_delta, answer)
        return answer, "length", usage or Usage()

    async def _said_before_tools(
        self, msg: InboundMessage, text: str, on_delta: DeltaCallback | None
    ) -> None:
        """Text the model wrote before calling tools is part of what the user sees, in both modes.

        A stream has shown it already: a blank line separates it from what follows. Otherwise
        it goes out like a `message` to this chat, so a JSON reply holds the same text, in the
        same order, as the stream would have.
        """
        if on_delta is not None:
            await _relay(on_delta, "\n\n")
            return
        self._bus.publish_outbound(
            OutboundMessage(msg.channel, msg.chat_id, text, OutboundKind.MESSAGE, msg.request_id)
        )

    async def _ask(self, msg: InboundMessage, prompt: Prompt, on_delta: DeltaCallback | None) -> LLMResponse:
        """One model call; refused for context length, it is tried once more without the oldest turns."""
        defaults = self._defaults
        while True:
            # Each call (retries included) is timed by outcome; timed here, not in a wrapper
            # coroutine: every await level costs on each of the call's wake-ups.
            started = time.monotonic()
            outcome = "ok"
            try:
                return await self._provider.chat(
                    prompt.messages,
                    tools=self._tools.definitions(msg.channel) if msg.use_tools else (),
                    max_tokens=msg.max_tokens or defaults.max_tokens,
                    temperature=defaults.temperature if msg.temperature is None else msg.temperature,
                    on_delta=on_delta,
                    response_format=msg.response_format,
                )
            except ContextLengthError as exc:
                outcome = "context_length"
                had_history = prompt.history_end > prompt.history_start
                if prompt.trimmed or not prompt.drop_oldest_turns():
                    raise ContextLengthError(too_long(exc, had_history)) from exc
                log.info("context length exceeded on %s: retrying without the oldest turns", msg.session_key)
            except BaseException as exc:
                outcome = _outcome(exc)
                raise
            finally:
                self._metrics.upstream(outcome, time.monotonic() - started)


def _outcome(exc: BaseException) -> str:
    """The ``outcome`` label of a failed upstream call (a bounded set)."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, ContextLengthError):
        return "context_length"
    if isinstance(exc, ProviderTimeoutError):
        return "timeout"
    return "error"


async def _relay(on_delta: DeltaCallback, text: str) -> None:
    waiting = on_delta(text)
    if waiting is not None:
        await waiting
