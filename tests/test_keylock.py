"""The per-session turn locks (nanobot.storage.keylock): FIFO, and cancellation never strands a session."""

from __future__ import annotations

import asyncio

from nanobot.storage.keylock import KeyedLocks


async def test_turns_on_one_key_run_in_arrival_order_and_other_keys_do_not_wait() -> None:
    """Turns on one session run one at a time in the order they came; another session runs meanwhile."""
    locks = KeyedLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def turn(key: str, name: str) -> None:
        async with locks(key):
            order.append(name)
            if name == "a1":
                await release.wait()

    first = asyncio.create_task(turn("a", "a1"))
    await asyncio.sleep(0)  # a1 holds "a"
    rest = [asyncio.create_task(turn("a", f"a{i}")) for i in (2, 3, 4)]
    await turn("b", "b1")  # not behind a1
    assert order == ["a1", "b1"]
    release.set()
    await asyncio.gather(first, *rest)
    assert order == ["a1", "b1", "a2", "a3", "a4"]
    assert not locks.held("a") and not locks.held("b")


async def test_a_waiter_cancelled_in_the_queue_or_at_hand_over_does_not_strand_the_session() -> None:
    """A turn cancelled while queued, or just after the lock was handed to it, lets the next one run."""
    locks = KeyedLocks()
    await locks.acquire("s")
    queued = asyncio.create_task(locks.acquire("s"))
    handed = asyncio.create_task(locks.acquire("s"))
    last = asyncio.create_task(locks.acquire("s"))
    await asyncio.sleep(0)
    queued.cancel()  # cancelled while waiting in line
    await asyncio.sleep(0)
    locks.release("s")  # handed to `handed`, which is cancelled before it runs
    handed.cancel()
    await asyncio.wait_for(last, 5)  # the lock reached the last waiter
    assert queued.cancelled() and handed.cancelled()
    locks.release("s")
    assert not locks.held("s")
