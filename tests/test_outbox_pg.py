"""The outbox shared by several processes on one PostgreSQL: lanes, leases, fencing, wake-ups, holds.

Each :class:`PgOutbox` here stands for one process (its own pool and listening connection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from nanobot.bus import DeliveryReceipt, MessageBus, OutboundMessage
from nanobot.storage.outbox import NewMessage, State
from nanobot.storage.postgres import PgOutbox, PgStorage
from nanobot.storage_config import StorageConfig
from pg import StallingProxy

from fake_platforms import FakeTelegram, make_config, running

Opener = Callable[..., Awaitable[PgOutbox]]
TELEGRAM = frozenset({"telegram"})


@pytest.fixture
async def process(pg_url: str) -> AsyncIterator[Opener]:
    """Opens one 'process' (storage + outbox) on the test database; all closed at the end."""
    opened: list[tuple[PgStorage, PgOutbox]] = []

    async def open_one(lease: float = 5.0, url: str = "") -> PgOutbox:
        config = StorageConfig(url=url or pg_url, lease_seconds=lease)
        storage = await PgStorage.open(config)
        outbox = PgOutbox(storage.pool, config)
        await outbox.open()
        opened.append((storage, outbox))
        return outbox

    yield open_one
    for storage, outbox in reversed(opened):
        await outbox.stop()
        await outbox.close()
        await storage.close()


def news(chat: str, *texts: str) -> list[NewMessage]:
    return [NewMessage("telegram", chat, "message", t, {}) for t in texts]


async def test_a_chat_is_delivered_by_one_process_at_a_time(process: Opener) -> None:
    """Two processes never both get one chat's messages; each chat goes to exactly one of them."""
    one, two = await process(), await process()
    await one.recover(TELEGRAM, 3600)
    await two.recover(TELEGRAM, 3600)
    await one.add(news("1", "a", "b"))  # lane 1: claimed by the process that enqueued
    await two.add(news("1", "c") + news("2", "d"))  # c joins one's lane; lane 2 is two's
    assert one.holds("telegram", "1") and not two.holds("telegram", "1")
    assert two.holds("telegram", "2") and not one.holds("telegram", "2")
    mine_one = [e.content for e in await one.recover(TELEGRAM, 3600)]
    mine_two = [e.content for e in await two.recover(TELEGRAM, 3600)]
    assert mine_one == ["a", "b", "c"] and mine_two == ["d"]


async def test_lanes_of_a_dead_process_are_taken_over_after_the_lease(process: Opener) -> None:
    """A process that stops renewing (died) loses its chats after the lease; its stale writes are refused."""
    dead, alive = await process(lease=0.5), await process(lease=0.5)
    await dead.recover(TELEGRAM, 3600)
    await alive.recover(TELEGRAM, 3600)
    await dead.add(news("1", "a", "b"))
    first, _second = await dead.recover(TELEGRAM, 3600)
    assert await alive.recover(TELEGRAM, 3600) == []  # held by the other, within its lease
    deadline = time.monotonic() + 30
    while not (taken := await alive.recover(TELEGRAM, 3600)):
        assert time.monotonic() < deadline, "the lane was never taken over"
        await asyncio.sleep(0.05)  # (polling the database with a deadline)
    assert [e.content for e in taken] == ["a", "b"]
    assert not dead.holds("telegram", "1")  # its lease ran out: its lanes stop before sending
    first.state = State.DELIVERED
    await dead.save_soon(first)  # a stalled holder's late result: fenced off
    assert [e.content for e in await alive.recover(TELEGRAM, 3600)] == ["a", "b"]


async def test_an_enqueue_elsewhere_wakes_an_idle_process(process: Opener) -> None:
    """A message added by one process wakes the others at once (NOTIFY), no polling needed."""
    one, two = await process(lease=60), await process(lease=60)
    woken = asyncio.Event()
    await two.start(woken.set)
    await two.recover(TELEGRAM, 3600)
    woken.clear()
    await one.add(news("5", "hello"))  # one has not claimed anything: the lane is free
    async with asyncio.timeout(10):
        await woken.wait()
    assert [e.content for e in await two.recover(TELEGRAM, 3600)] == ["hello"]


async def test_a_stopping_process_hands_its_chats_over_at_once(process: Opener) -> None:
    """A clean stop gives every lane back: another process takes them without waiting for the lease."""
    leaving, staying = await process(lease=600), await process(lease=600)
    await leaving.recover(TELEGRAM, 3600)
    await leaving.add(news("1", "a"))
    woken = asyncio.Event()
    await staying.start(woken.set)
    await staying.recover(TELEGRAM, 3600)
    woken.clear()
    await leaving.stop()
    async with asyncio.timeout(10):
        await woken.wait()
    assert [e.content for e in await staying.recover(TELEGRAM, 3600)] == ["a"]


async def test_a_rate_limit_seen_by_one_process_holds_the_others(process: Opener) -> None:
    """A platform's Retry-After seen by one process holds that channel in every process."""
    one, two, late = await process(), await process(), await process()
    await two.start(lambda: None)
    one.hold("telegram", 30)
    assert one.held_for("telegram") > 20
    deadline = time.monotonic() + 10
    while two.held_for("telegram") == 0:  # announced with NOTIFY
        assert time.monotonic() < deadline, "the hold never reached the other process"
        await asyncio.sleep(0.01)
    assert two.held_for("telegram") > 20 and two.held_for("discord") == 0
    await late.recover(TELEGRAM, 3600)  # a process that starts later reads it from the table
    assert late.held_for("telegram") > 20


async def test_nul_characters_are_stored_without_them(process: Opener) -> None:
    """PostgreSQL text cannot hold U+0000: the outbox drops it instead of failing the message."""
    one = await process()
    await one.recover(TELEGRAM, 3600)
    await one.add([NewMessage("telegram", "9\x00", "message", "a\x00b", {"k\x00": "v\x00"})])
    [stored] = await one.recover(TELEGRAM, 3600)
    assert (stored.chat_id, stored.content, stored.metadata) == ("9", "ab", {"k": "v"})


@pytest.fixture
async def telegram(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeTelegram, str]:
    fake = FakeTelegram()
    server = await aiohttp_server(fake.app, access_log=None)
    return fake, str(server.make_url("")).rstrip("/")




async def test_a_message_another_process_stored_first_is_sent_first(
    process: Opener, telegram: tuple[FakeTelegram, str], tmp_path: Path, pg_url: str
) -> None:
    """A message stored by another process for a chat this one delivers goes out before this
    process's own later message to that chat, even before the other's NOTIFY has come (here it
    never comes: the proxy in front of this process drops notifications)."""
    fake, url = telegram
    config = make_config(tmp_path, telegram=url)
    proxy = StallingProxy(pg_url)
    through_proxy = await proxy.start()
    try:
        buses = MessageBus(), MessageBus()
        deaf, other = await process(url=through_proxy), await process()
        async with running(config, buses[0], (deaf, deaf)), running(config, buses[1], (other, other)):
            proxy.mute = True

            async def publish(bus: MessageBus, text: str) -> DeliveryReceipt:
                receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
                bus.publish_outbound(OutboundMessage("telegram", "7", text, receipt=receipt))
                return await receipt

            assert (await publish(buses[0], "first")).status == "sent"  # its lane: the deaf process's
            await publish(buses[1], "second")  # stored by the other process, delivered by the deaf one
            await publish(buses[0], "third")
            await fake.until(lambda: len(fake.sent) >= 3, within=30)
        assert fake.texts(7) == ["first", "second", "third"]
    finally:
        await proxy.close()


async def test_two_managers_share_the_chats_in_order(
    process: Opener, telegram: tuple[FakeTelegram, str], tmp_path: Path
) -> None:
    """Messages to one chat published alternately through two processes arrive once each, in
    order; a sender whose chat another process delivers is told so at once."""
    fake, url = telegram
    config = make_config(tmp_path, telegram=url)
    buses = MessageBus(), MessageBus()
    first, second = await process(), await process()
    async with running(config, buses[0], (first, first)), running(config, buses[1], (second, second)):
        receipts = []
        for i in range(120):  # each committed before the next is published: that is the order
            receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
            buses[i % 2].publish_outbound(OutboundMessage("telegram", str(i % 3), f"m{i}", receipt=receipt))
            receipts.append(await receipt)
        await fake.until(lambda: len(fake.sent) >= 120, within=60)
    for chat in range(3):
        assert fake.texts(chat) == [f"m{i}" for i in range(chat, 120, 3)]
    assert len(fake.sent) == 120
    assert DeliveryReceipt("queued", "another nanobot process delivers to this chat") in receipts
