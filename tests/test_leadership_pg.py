"""Channel leadership and inbound update ids on PostgreSQL, one ``PgChannelInbound`` per "process".

Each instance stands for one nanobot process's side of one channel: its own dedicated
connection, on one fresh database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from nanobot.storage.postgres import PgStorage
from nanobot.storage.postgres.leadership import PgChannelInbound
from nanobot.storage_config import StorageConfig

TOKEN = "123456:SECRET-leader-token"
Make = Callable[..., PgChannelInbound]


@pytest.fixture
async def make(pg_url: str) -> AsyncIterator[Make]:
    """Builds ``PgChannelInbound``s on a migrated database; closes them all at the end."""
    storage = await PgStorage.open(StorageConfig(url=pg_url, pool_size=2))
    made: list[PgChannelInbound] = []

    def build(channel: str = "telegram", token: str = TOKEN) -> PgChannelInbound:
        inbound = PgChannelInbound(StorageConfig(url=pg_url), channel, token, retry=0.05)
        made.append(inbound)
        return inbound

    yield build
    for inbound in made:
        await inbound.close()
    await storage.close()


class Worker:
    """``work`` for ``lead``: notes when it runs and when it is stopped."""

    def __init__(self) -> None:
        self.running = asyncio.Event()
        self.stopped = asyncio.Event()
        self.runs = 0

    async def __call__(self) -> None:
        self.runs += 1
        self.running.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.stopped.set()


async def lock_holders(pg_url: str) -> list[int]:
    """Backend pids holding an advisory lock now."""
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")
        return [row["pid"] for row in rows]
    finally:
        await conn.close()


async def test_a_leader_whose_connection_dies_stops_and_the_lead_is_taken_again(
    make: Make, pg_url: str
) -> None:
    """Two processes on one bot: one works; when its database connection is cut, its work stops at
    once, and one of the two (the first trying, on a new connection) leads again."""
    one, two = make(), make()
    first, second = Worker(), Worker()
    tasks = [asyncio.create_task(one.lead(first)), asyncio.create_task(two.lead(second))]
    try:
        async with asyncio.timeout(20):
            waits = [asyncio.ensure_future(w.running.wait()) for w in (first, second)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            worker, other = (first, second) if first.running.is_set() else (second, first)
            assert not other.running.is_set() and [one.leading, two.leading].count(True) == 1
            (holder,) = await lock_holders(pg_url)
            conn = await asyncpg.connect(pg_url)
            await conn.execute("SELECT pg_terminate_backend($1)", holder)  # as when the process dies
            await conn.close()
            await worker.stopped.wait()
            while worker.runs < 2 and not other.running.is_set():  # noqa: ASYNC110 (other connections)
                await asyncio.sleep(0.01)
        assert [one.leading, two.leading].count(True) == 1 and len(await lock_holders(pg_url)) == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_closing_the_leader_hands_over_at_once(make: Make) -> None:
    """A leader that stops (SIGTERM) frees the lead: a follower works right after."""
    one, two = make(), make()
    first, second = Worker(), Worker()
    tasks = [asyncio.create_task(one.lead(first))]
    try:
        async with asyncio.timeout(20):
            await first.running.wait()
            tasks.append(asyncio.create_task(two.lead(second)))
            tasks[0].cancel()
            await asyncio.gather(tasks[0], return_exceptions=True)
            await one.close()
            await second.running.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_each_bot_and_channel_has_its_own_leader(make: Make) -> None:
    """Two bots (tokens), or two channels, on one database lead side by side."""
    workers = [Worker() for _ in range(3)]
    inbounds = [make("telegram", TOKEN), make("telegram", TOKEN + "2"), make("discord", TOKEN)]
    tasks = [asyncio.create_task(i.lead(w)) for i, w in zip(inbounds, workers, strict=True)]
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(w.running.wait() for w in workers))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_update_ids_are_taken_once_across_processes(make: Make, pg_url: str) -> None:
    """An id recorded by one process is not fresh for another; another bot's ids are its own;
    the stored name holds a digest of the token, never the token."""
    one, two, other_bot = make(), make(), make(token=TOKEN + "2")
    assert await one.fresh(["1", "2", "2"]) == ["1", "2"]
    assert await two.fresh(["2", "3", "1"]) == ["3"]
    assert await other_bot.fresh(["1"]) == ["1"]
    conn = await asyncpg.connect(pg_url)
    try:
        names = {row["channel"] for row in await conn.fetch("SELECT channel FROM inbound_updates")}
    finally:
        await conn.close()
    assert len(names) == 2 and all(n.startswith("telegram:") and "SECRET" not in n for n in names)


async def test_old_update_ids_are_pruned(make: Make, pg_url: str) -> None:
    """Ids older than two days are forgotten (Telegram keeps an update 24 hours)."""
    one = make()
    assert await one.fresh(["old", "recent"]) == ["old", "recent"]
    conn = await asyncpg.connect(pg_url)
    try:
        aged = "UPDATE inbound_updates SET seen_at = now() - interval '3 days' WHERE update_id = 'old'"
        await conn.execute(aged)
    finally:
        await conn.close()
    later = make()  # (a process prunes when it first records)
    assert await later.fresh(["old", "recent"]) == ["old"]


async def test_an_unreachable_database_keeps_followers_trying_quietly(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With the database down a follower neither works nor crashes; it says so once, without the
    password, and keeps trying."""
    bad = pg_url.rsplit(":", 1)[0] + ":1/nowhere"  # (port 1: nothing listens)
    inbound = PgChannelInbound(StorageConfig(url=bad, connect_timeout=1), "telegram", TOKEN, retry=0.01)
    worker = Worker()
    task = asyncio.create_task(inbound.lead(worker))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.5):
            await worker.running.wait()
    assert not worker.running.is_set() and not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    warnings = [r for r in caplog.records if "trying again" in r.getMessage()]
    assert len(warnings) == 1 and "pg-Secret" not in caplog.text
