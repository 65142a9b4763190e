"""The per-turn statements grouped on PostgreSQL (``storage/postgres/batches.py``).

With ``poolSize`` 2 a process sends its turns' statements on one connection, so statements made
in one go (as concurrent turns make them) go out as one grouped statement. Each turn must still
get exactly its own answer: its own version, its own lease, its own refusal or error, never a
neighbour's. Each ``PgStorage`` stands for one nanobot process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from nanobot.errors import LeaseLostError, StorageError
from nanobot.storage.sessions import SessionStore
from pg import Opener, opening

DEADLINE = 30.0  # seconds for the server to get somewhere on a loaded machine
TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

@pytest.fixture
async def open_storage(pg_url: str) -> AsyncIterator[Opener]:
    """Opens ``PgStorage``s ("processes") on one fresh database (poolSize 2); closes them all."""
    async with opening(pg_url, 2) as open_one:
        yield open_one


async def test_concurrent_turns_share_statements_and_each_gets_its_own_answer(
    open_storage: Opener, logged: Callable[[str], int]
) -> None:
    storage = await open_storage()
    keys = [f"api:group-{i}" for i in range(6)]
    for key in keys[:3]:  # (some sessions have history already, the others are new)
        await storage.sessions.append(key, TURN)
    taken_before, written_before = logged("nanobot_take_turn_leases("), logged("unnest($1::text[]")
    leases = await asyncio.gather(*(storage.leases.acquire(key, f"turn-{key}", 60) for key in keys))
    assert [lease.key for lease in leases] == keys
    assert len({lease.token for lease in leases}) == 6
    versions = [lease.version for lease in leases]
    assert all(v is not None for v in versions[:3]) and versions[3:] == [None] * 3
    written = await asyncio.gather(*(storage.sessions.append(lease.key, TURN, lease) for lease in leases))
    assert all(new > (old or 0) for new, old in zip(written, versions, strict=True))
    for key, lease in zip(keys, leases, strict=True):
        assert await storage.leases.holder(key) is None  # (each write gave its own lease back)
        assert len(await storage.sessions.load(key, 10)) == (4 if lease.version else 2)
    # the first of each went out alone, the other five together: two statements, not ten
    assert logged("nanobot_take_turn_leases(") - taken_before == 1
    assert logged("unnest($1::text[]") - written_before == 1


async def test_in_a_group_only_the_turn_that_lost_its_lease_is_refused(
    open_storage: Opener, logged: Callable[[str], int]
) -> None:
    slow, fast = await open_storage(), await open_storage()
    stale = await slow.leases.acquire("api:stale", "slow", 0.3)
    fresh = await asyncio.wait_for(fast.leases.acquire("api:stale", "fast", 60), 30)  # (after expiry)
    mine = await slow.leases.acquire("api:mine", "slow", 60)
    other = await slow.leases.acquire("api:other", "slow", 60)
    stale_turn = [{"role": "user", "content": "stale"}, {"role": "assistant", "content": "x"}]
    grouped = logged("unnest($1::text[]")
    outcomes = await asyncio.gather(
        slow.sessions.append("api:mine", TURN, mine),
        slow.sessions.append("api:stale", stale_turn, stale),
        slow.sessions.append("api:other", TURN, other),
        return_exceptions=True,
    )
    assert logged("unnest($1::text[]") - grouped == 1  # (the three went out as one statement)
    assert isinstance(outcomes[1], LeaseLostError) and "api:stale" in str(outcomes[1])
    assert isinstance(outcomes[0], int) and isinstance(outcomes[2], int)
    assert await slow.sessions.load("api:stale", 10) == []  # nothing of the stale turn written
    assert await fast.leases.holder("api:stale") == ("fast", fresh.token)  # the lease stays
    assert await slow.leases.holder("api:mine") is None and await slow.leases.holder("api:other") is None


async def test_a_row_the_server_refuses_fails_only_its_own_turn(
    open_storage: Opener, logged: Callable[[str], int]
) -> None:
    """A group the server refuses as a whole is sent again statement by statement."""
    storage = await open_storage()
    bad = "api:nul\x00key"  # (PostgreSQL text cannot hold NUL: the server refuses the row)
    grouped = logged("unnest($1::text[]")
    outcomes = await asyncio.gather(
        storage.sessions.append("api:fine-1", TURN),
        storage.sessions.append(bad, TURN),
        storage.sessions.append("api:fine-2", TURN),
        return_exceptions=True,
    )
    assert logged("unnest($1::text[]") - grouped == 1  # (refused as a group, then one by one)
    assert isinstance(outcomes[1], StorageError) and "cannot save the conversation" in str(outcomes[1])
    assert isinstance(outcomes[0], int) and isinstance(outcomes[2], int)
    assert await storage.sessions.keys() == {"api:fine-1", "api:fine-2"}


async def test_grouped_lease_taking_waits_only_for_the_held_sessions(open_storage: Opener) -> None:
    one, two = await open_storage(), await open_storage()
    held = await one.leases.acquire("api:held", "one", 3600)  # (only a NOTIFY can wake a waiter)
    free = [f"api:free-{i}" for i in range(3)]
    waiting = asyncio.create_task(two.leases.acquire("api:held", "two", 3600))
    taken = await asyncio.gather(*(two.leases.acquire(key, "two", 3600) for key in free))
    assert [await one.leases.holder(key) for key in free] == [("two", lease.token) for lease in taken]
    assert not waiting.done()
    await one.sessions.append("api:held", TURN, held)  # (gives the lease back: the waiter wakes)
    second = await asyncio.wait_for(waiting, 30)
    assert second.version is not None and await one.leases.holder("api:held") == ("two", second.token)


async def test_two_writes_on_one_session_in_one_go_are_both_kept_in_order(open_storage: Opener) -> None:
    """A group holds one statement per session; the second waits for the next group."""
    storage = await open_storage()
    turns = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(3)]
    versions = await asyncio.gather(*(storage.sessions.append("api:same", turn) for turn in turns))
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert await storage.sessions.load("api:same", 10) == [m for turn in turns for m in turn]


async def test_a_group_on_a_lost_server_fails_every_turn_in_it_cleanly(
    open_storage: Opener, pg_url: str
) -> None:
    """The database goes away under a kept connection: each turn of the group gets a StorageError
    (not a driver exception, not a hang), and once it is back turns are written again."""
    storage = await open_storage()
    await storage.sessions.append("api:before", TURN)  # (a connection is kept: then it breaks)
    name = pg_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        outcomes = await asyncio.gather(
            *(storage.sessions.append(f"api:lost-{i}", TURN) for i in range(3)), return_exceptions=True
        )
        for outcome in outcomes:
            assert isinstance(outcome, StorageError) and "cannot save the conversation" in str(outcome)
        assert "Secret" not in " ".join(map(str, outcomes))
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()
    await storage.sessions.append("api:after", TURN)
    assert await storage.sessions.keys() == {"api:before", "api:after"}


async def test_a_turn_cancelled_while_its_write_waits_in_the_queue_is_still_saved(
    open_storage: Opener, pg_url: str
) -> None:
    """A client that goes away after its turn was handed to storage does not lose the turn, even
    when the write is still queued behind another turn's: leaving the turn must not give the
    session's lease back before the write (which gives it back itself) has run."""
    storage = await open_storage()
    store = SessionStore(storage.sessions, storage.leases)
    await storage.sessions.append("api:blocker", TURN)  # (its sessions row exists: lockable)
    ready, go = asyncio.Event(), asyncio.Event()

    async def turn_on(key: str, wait: bool) -> None:
        async with store.lock(key):
            await store.history(key)
            if wait:
                ready.set()
                await go.wait()
            await store.append_turn(key, TURN)

    leaving = asyncio.create_task(turn_on("api:leaving", wait=True))
    await asyncio.wait_for(ready.wait(), DEADLINE)  # it holds its lease, and waits to write
    admin = await asyncpg.connect(pg_url)
    try:
        blocking = admin.transaction()
        await blocking.start()  # the blocker's write will wait for this row: the connection is busy
        await admin.execute("SELECT 1 FROM sessions WHERE key = 'api:blocker' FOR UPDATE")
        blocked = asyncio.create_task(turn_on("api:blocker", wait=False))
        async with asyncio.timeout(DEADLINE):  # (the server's state: polled, with a deadline)
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            while not await admin.fetchval(waiting + " AND datname = current_database()"):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        go.set()
        for _ in range(3):  # (the leaving turn hands its write over: queued behind the blocked one)
            await asyncio.sleep(0)
        leaving.cancel()  # ... and its client goes away
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await blocking.rollback()
        await asyncio.wait_for(blocked, DEADLINE)
    finally:
        await admin.close()
    async with asyncio.timeout(DEADLINE):  # (the queued write runs after the blocked one)
        while not await storage.sessions.load("api:leaving", 10):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert await storage.sessions.load("api:leaving", 10) == TURN
    assert await storage.leases.holder("api:leaving") is None
