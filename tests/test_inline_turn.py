"""A non-streaming request's turn runs in the request's own task (MessageBus.run_inbound):
the bus hands it over without a task of its own, and without a runner it is queued as before."""

from __future__ import annotations

import asyncio

from nanobot.bus import InboundMessage, MessageBus


async def test_without_a_runner_the_message_is_queued_for_the_consumer() -> None:
    """A bus nobody runs turns on (the agent not started) queues the message, as publish does."""
    bus = MessageBus()
    msg = InboundMessage("api", "s", "hi", request_id="t1")
    assert bus.run_inbound(msg) is None
    assert await asyncio.wait_for(bus.consume_inbound(), 5) is msg


async def test_the_runner_runs_in_the_callers_task_and_its_cancellation_reaches_it() -> None:
    """The turn runs in the caller's task, and cancelling the caller (the client left) stops it."""
    bus = MessageBus()
    started = asyncio.Event()
    ran_in: list[asyncio.Task[object] | None] = []
    stopped: list[str] = []

    async def runner(msg: InboundMessage) -> None:
        ran_in.append(asyncio.current_task())
        started.set()
        try:
            await asyncio.Event().wait()  # a turn that never ends by itself
        except asyncio.CancelledError:
            stopped.append(msg.request_id)
            raise

    bus.attach_inbound(lambda _msg: None, runner)
    running = bus.run_inbound(InboundMessage("api", "s", "hi", request_id="t2"))
    assert running is not None

    async def request() -> None:
        await running

    caller = asyncio.create_task(request())
    await asyncio.wait_for(started.wait(), 5)
    assert ran_in == [caller]
    caller.cancel()
    await asyncio.wait([caller], timeout=5)
    assert caller.cancelled() and stopped == ["t2"]
    bus.attach_inbound(None)  # detached: back to the queue
    assert bus.run_inbound(InboundMessage("api", "s", "again")) is None
    assert (await asyncio.wait_for(bus.consume_inbound(), 5)).content == "again"
