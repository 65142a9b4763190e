"""The outbox contract, run on both backends: the embedded SQLite file and PostgreSQL.

The store itself (add, recover, save, counts) and the manager on top of it (held messages,
order per chat, NUL characters) behave the same whichever ``storage.url`` names.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from nanobot.bus import DeliveryReceipt, MessageBus, OutboundKind, OutboundMessage
from nanobot.delivery.ownership import LaneOwnership, OneProcess
from nanobot.storage.outbox import NewMessage, Outbox, State
from nanobot.storage.postgres import PgOutbox, PgStorage
from nanobot.storage.sqlite.outbox import OutboxStore
from nanobot.storage_config import StorageConfig

from fake_platforms import FakeTelegram, make_config, running

ServerFactory = Callable[..., Awaitable[TestServer]]
Backend = Callable[[], Awaitable[tuple[Outbox, LaneOwnership]]]


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Opens outboxes of one kind on one shared place (a file, or a database): each a 'process'."""
    closers: list[Callable[[], Awaitable[None]]] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else ""

    async def open_one() -> tuple[Outbox, LaneOwnership]:
        if not url:
            return OutboxStore(tmp_path / "outbox.db"), OneProcess()
        storage = await PgStorage.open(StorageConfig(url=url, lease_seconds=5))
        closers.append(storage.close)
        outbox = PgOutbox(storage.pool, StorageConfig(url=url, lease_seconds=5))
        return outbox, outbox

    yield open_one
    for close in reversed(closers):
        await close()


def news(chat: str, *texts: str, held: bool = False) -> list[NewMessage]:
    return [NewMessage("telegram", chat, "message", t, {"k": "v"}, held) for t in texts]


async def test_added_messages_come_back_pending_in_order(backend: Backend) -> None:
    """What was added is what a restart resumes: pending, oldest first, metadata intact."""
    store, _ = await backend()
    await store.open()
    added = await store.add(news("1", "a", "b") + news("2", "c") + news("3", "held", held=True))
    assert [e.state for e in added] == [State.PENDING] * 3 + [State.HELD]
    assert len({e.id for e in added}) == 4 and len({e.uid for e in added}) == 4
    pending = await store.recover(frozenset({"discord"}), 3600)  # telegram not enabled: nothing to send
    assert pending == []
    resumed = await store.recover(frozenset({"telegram"}), 3600)
    assert [(e.chat_id, e.content, e.metadata) for e in resumed] == [
        ("1", "a", {"k": "v"}), ("1", "b", {"k": "v"}), ("2", "c", {"k": "v"}), ("3", "held", {"k": "v"}),
    ]  # fmt: skip
    await store.close()


async def test_delivered_and_failed_messages_are_not_resumed(backend: Backend) -> None:
    """A saved delivery result sticks: delivered and failed messages are never resumed; counts say so."""
    store, _ = await backend()
    await store.open()
    await store.add(news("1", "a", "b", "c"))
    first, second, _third = await store.recover(frozenset({"telegram"}), 3600)
    first.state, second.state, second.last_error = State.DELIVERED, State.FAILED, "blocked"
    await store.save_soon(first)
    await store.save_soon(second)
    assert [e.content for e in await store.recover(frozenset({"telegram"}), 3600)] == ["c"]
    counts = await store.counts()
    assert counts == {"pending": 1, "held": 0, "failed": 1, "expired": 0}
    await store.close()


async def test_old_held_messages_expire_when_their_channel_returns(backend: Backend) -> None:
    """A held message older than heldMaxAgeSeconds expires instead of going out late."""
    store, _ = await backend()
    await store.open()
    await store.add(news("1", "stale", held=True))
    assert await store.recover(frozenset({"telegram"}), 0) == []
    assert (await store.counts())["expired"] == 1
    await store.close()


# --------------------------------------------------------------------------- the manager




@pytest.fixture
async def telegram(aiohttp_server: ServerFactory) -> tuple[FakeTelegram, str]:
    fake = FakeTelegram()
    server = await aiohttp_server(fake.app)
    return fake, str(server.make_url("")).rstrip("/")


async def test_messages_to_many_chats_arrive_once_in_order(
    backend: Backend, telegram: tuple[FakeTelegram, str], tmp_path: Path
) -> None:
    """300 messages to 6 chats all arrive, once each, in order per chat."""
    fake, url = telegram
    bus = MessageBus()
    async with running(make_config(tmp_path, telegram=url), bus, await backend()) as manager:
        for i in range(300):
            bus.publish_outbound(OutboundMessage("telegram", str(i % 6), f"m{i}", OutboundKind.MESSAGE))
        await fake.until(lambda: len(fake.sent) >= 300, within=60)
        await manager.wait_idle()
    for chat in range(6):
        assert fake.texts(chat) == [f"m{i}" for i in range(chat, 300, 6)]
    assert len(fake.sent) == 300


async def test_nul_characters_are_dropped_not_fatal(
    backend: Backend, telegram: tuple[FakeTelegram, str], tmp_path: Path
) -> None:
    """NUL characters (PostgreSQL text cannot hold them) are dropped when stored, not a failure."""
    fake, url = telegram
    bus = MessageBus()
    receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
    async with running(make_config(tmp_path), bus, await backend()) as manager:  # telegram off: held
        bus.publish_outbound(OutboundMessage("telegram", "7\x00", "nul\x00 here\x00", receipt=receipt,
                                             metadata={"note": "a\x00b"}))  # fmt: skip
        assert (await receipt).status == "queued"
        await manager.wait_idle()
        [stored] = await manager.store.recover(frozenset({"telegram"}), 3600)
    assert (stored.chat_id, stored.content, stored.metadata) == ("7", "nul here", {"note": "ab"})
    async with running(make_config(tmp_path, telegram=url), bus, await backend()) as manager:
        await fake.until(lambda: len(fake.sent) >= 1)
        await manager.wait_idle()
    assert fake.texts("7") == ["nul here"]


async def test_held_messages_wait_for_their_channel(
    backend: Backend, telegram: tuple[FakeTelegram, str], tmp_path: Path
) -> None:
    """Messages for a channel that is not enabled are held, then sent in order once it is."""
    fake, url = telegram
    bus = MessageBus()
    receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
    async with running(make_config(tmp_path), bus, await backend()) as manager:
        bus.publish_outbound(OutboundMessage("telegram", "9", "one", receipt=receipt))
        bus.publish_outbound(OutboundMessage("telegram", "9", "two"))
        assert await receipt == DeliveryReceipt("queued", "channel telegram is not enabled")
        await manager.wait_idle()
    assert fake.send_calls == 0
    async with running(make_config(tmp_path, telegram=url), bus, await backend()) as manager:
        await fake.until(lambda: len(fake.sent) >= 2)
        await manager.wait_idle()
    assert fake.texts("9") == ["one", "two"]

