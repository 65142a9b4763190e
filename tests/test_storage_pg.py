"""PostgreSQL storage: start-up (migrations, errors), and turn leases with fencing across processes.

Each ``PgStorage`` here stands for one nanobot process: its own pool and its own listening
connection on the same database.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import orjson
import pytest

from nanobot.config import parse_config
from nanobot.errors import ConfigError, LeaseLostError, StorageError
from nanobot.redact import config_secrets
from nanobot.storage.postgres import SCHEMA_VERSION, PgStorage
from nanobot.storage.postgres.leases import CHANNEL, _digest
from nanobot.storage.sessions import SessionStore
from nanobot.storage_config import StorageConfig
from pg import _QUOTED_PASSWORD, PASSWORD, Opener, PgServer, StallingProxy, opening

TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

@pytest.fixture
async def open_storage(pg_url: str) -> AsyncIterator[Opener]:
    """Opens ``PgStorage``s ("processes") on one fresh database (poolSize 4); closes them all."""
    async with opening(pg_url, 4) as open_one:
        yield open_one


# --------------------------------------------------------------------------- start-up


async def test_ten_processes_starting_at_once_migrate_once(pg_url: str) -> None:
    """Ten processes starting together on an empty database all start, and the schema is made once."""
    config = StorageConfig(url=pg_url, pool_size=2)
    started = await asyncio.gather(*(PgStorage.open(config) for _ in range(10)))
    try:
        assert sorted(s.schema_found for s in started) == [0] + [SCHEMA_VERSION] * 9
        versions = await started[0].pool.fetch("SELECT version FROM nanobot_schema ORDER BY version")
        assert [r["version"] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
        tables = await started[0].pool.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        assert {r["tablename"] for r in tables} >= {
            "sessions", "turns", "turn_leases", "outbox", "outbox_lanes", "inbound_updates",
        }  # fmt: skip
    finally:
        await asyncio.gather(*(s.close() for s in started))


async def test_a_database_from_a_newer_nanobot_is_refused(pg_url: str) -> None:
    """Start-up refuses a database whose schema is newer than this nanobot knows, and says so."""
    storage = await PgStorage.open(StorageConfig(url=pg_url))
    await storage.pool.execute("INSERT INTO nanobot_schema (version) VALUES ($1)", SCHEMA_VERSION + 5)
    await storage.close()
    with pytest.raises(StorageError, match="newer nanobot"):
        await PgStorage.open(StorageConfig(url=pg_url))


async def test_a_wrong_password_is_one_clean_error_without_the_password(
    pg_server: PgServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused login names the database and the cause, never the password that was tried."""
    wrong = "Wr0ng-Secret-Pass"
    url = pg_url.replace(_QUOTED_PASSWORD, wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as caught:
        await PgStorage.open(StorageConfig(url=url))
    message = str(caught.value)
    assert f"127.0.0.1:{pg_server.port}/" in message and "password authentication failed" in message
    assert wrong not in message and PASSWORD not in message
    assert wrong not in caplog.text


async def test_an_unreachable_server_is_one_clean_error(unused_tcp_port: int) -> None:
    """A server that is not there is a StorageError naming the address, soon, not a hang."""
    url = f"postgresql://u:Sup3r-Secret-Pw@127.0.0.1:{unused_tcp_port}/db"
    with pytest.raises(StorageError) as caught:
        await PgStorage.open(StorageConfig(url=url, connect_timeout=5))
    message = str(caught.value)
    assert f"127.0.0.1:{unused_tcp_port}/db" in message and "Sup3r-Secret-Pw" not in message


def test_storage_url_is_checked_and_kept_secret() -> None:
    """storage.url must be sqlite or postgresql://; its password counts as a secret everywhere."""
    url = "postgresql://bot:Pa55%2Fword-long@db.internal:5432/nanobot"
    config = parse_config({"storage": {"url": url, "leaseSeconds": 12}})
    assert config.storage.is_postgres and config.storage.lease_seconds == 12
    assert url not in repr(config) and "Pa55" not in repr(config)
    assert {url, "Pa55%2Fword-long", "Pa55/word-long"} <= config_secrets(config)
    assert not parse_config({"storage": {"url": "sqlite"}}).storage.is_postgres
    with pytest.raises(ConfigError, match=r"storage\.url") as caught:
        parse_config({"storage": {"url": "mysql://root:Hunter2-Secret@h/db"}})
    assert "Hunter2" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"storage\.leaseSeconds"):
        parse_config({"storage": {"leaseSeconds": 0}})
    assert parse_config({"storage": {"probeSeconds": 0.5}}).storage.probe_seconds == 0.5
    with pytest.raises(ConfigError, match=r"storage\.probeSeconds"):
        parse_config({"storage": {"probeSeconds": 0}})


# --------------------------------------------------------------------------- turn leases


async def tried(storage: PgStorage, attempts: int) -> None:
    """Wait until ``attempts`` lease attempts were made in all (each draws a token, won or not)."""
    async with asyncio.timeout(30):
        # (another process's state: polled, with a deadline)
        while await storage.pool.fetchval("SELECT last_value FROM turn_lease_tokens") < attempts:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_two_processes_take_turns_on_one_session(open_storage: Opener) -> None:
    """While one process holds a session's lease, another waits; a release wakes it at once."""
    one, two = await open_storage(), await open_storage()
    first = await one.leases.acquire("api:s", "one", 3600)  # (only a NOTIFY can wake the waiter)
    assert first.version is None  # (no turns yet)
    waiting = asyncio.create_task(two.leases.acquire("api:s", "two", 3600))
    await tried(one, first.token + 1)  # the other process has tried, and waits
    await one.sessions.append("api:s", TURN, first, release=False)
    assert await two.leases.holder("api:s") == ("one", first.token)
    assert not waiting.done()
    version = await one.sessions.append("api:s", TURN, first)  # ... and gives the lease back
    second = await asyncio.wait_for(waiting, 30)
    assert second.token > first.token and second.version == version
    assert await one.leases.holder("api:s") == ("two", second.token)
    await two.sessions.append("api:s", TURN, second)
    assert len(await one.sessions.load("api:s", 10)) == 6
    assert await one.leases.holder("api:s") is None


async def test_waiters_in_one_process_are_served_in_order(open_storage: Opener) -> None:
    """Turns queued on one session in one process run in the order they arrived."""
    storage = await open_storage()
    lease = await storage.leases.acquire("api:q", "first", 3600)
    order: list[str] = []

    async def turn_of(name: str) -> None:
        mine = await storage.leases.acquire("api:q", name, 3600)
        order.append(name)
        await storage.leases.release("api:q", mine.token)

    waiters = [asyncio.create_task(turn_of(f"w{i}")) for i in range(5)]
    await storage.leases.release("api:q", lease.token)
    await asyncio.wait_for(asyncio.gather(*waiters), 30)
    assert order == [f"w{i}" for i in range(5)]


async def test_only_a_release_someone_waited_for_is_announced(pg_url: str, open_storage: Opener) -> None:
    """An uncontended turn sends no NOTIFY (it took a lock that serialised every commit on the
    server); a release with a waiter still wakes it. Notifications arrive in commit order, so
    once the contended one is seen, an earlier uncontended one would have been seen before it."""
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(pg_url)
    await listener.add_listener(CHANNEL, lambda _c, _p, _ch, payload: heard.put_nowait(payload))
    try:
        one, two = await open_storage(), await open_storage()
        quiet = await one.leases.acquire("api:quiet", "one", 3600)
        await one.sessions.append("api:quiet", TURN, quiet)  # (the write gives the lease back)
        alone = await one.leases.acquire("api:alone", "one", 3600)
        assert await one.leases.release("api:alone", alone.token)
        held = await one.leases.acquire("api:busy", "one", 3600)
        waiting = asyncio.create_task(two.leases.acquire("api:busy", "two", 3600))
        await tried(one, held.token + 1)
        await one.sessions.append("api:busy", TURN, held)
        second = await asyncio.wait_for(waiting, 30)
        assert await asyncio.wait_for(heard.get(), 30) == _digest("api:busy")
        assert heard.empty()
        assert await two.leases.release("api:busy", second.token)  # (nobody waited this time)
        again = await one.leases.acquire("api:busy", "one", 3600)
        waiting = asyncio.create_task(two.leases.acquire("api:busy", "two", 3600))
        await tried(one, again.token + 1)
        assert await one.leases.release("api:busy", again.token)  # (the release statement's own NOTIFY)
        await two.leases.release("api:busy", (await asyncio.wait_for(waiting, 30)).token)
        assert await asyncio.wait_for(heard.get(), 30) == _digest("api:busy")
        assert heard.empty()
    finally:
        await listener.close()


async def test_a_crashed_holder_blocks_its_session_only_until_the_lease_ends(open_storage: Opener) -> None:
    """A process that dies holding a lease (never releasing) blocks that session only for its lease."""
    crashed, survivor = await open_storage(), await open_storage()
    await crashed.leases.acquire("api:c", "crashed", 0.5)
    crashed.pool.terminate()  # gone without a word: no release, no NOTIFY
    await crashed.leases.close()
    lease = await asyncio.wait_for(survivor.leases.acquire("api:c", "survivor", 30), 30)
    assert await survivor.leases.holder("api:c") == ("survivor", lease.token)
    await survivor.sessions.append("api:c", TURN, lease)
    assert await survivor.sessions.load("api:c", 10) == TURN


async def test_a_stalled_holder_cannot_write_over_a_newer_turn(open_storage: Opener) -> None:
    """A turn that ran past its lease is refused when it tries to save; the newer turn stands."""
    slow, fast = await open_storage(), await open_storage()
    stale = await slow.leases.acquire("api:f", "slow", 0.3)
    fresh = await asyncio.wait_for(fast.leases.acquire("api:f", "fast", 30), 30)  # after expiry
    newer = [{"role": "user", "content": "newer"}, {"role": "assistant", "content": "kept"}]
    await fast.sessions.append("api:f", newer, fresh, release=False)
    with pytest.raises(LeaseLostError, match="not saved"):
        await slow.sessions.append("api:f", [{"role": "user", "content": "stale"}], stale)
    assert not await slow.leases.renew("api:f", stale.token, 30)
    assert not await slow.leases.release("api:f", stale.token)  # ... and cannot free the newer holder
    assert await fast.leases.holder("api:f") == ("fast", fresh.token)
    assert await fast.sessions.load("api:f", 10) == newer
    assert await fast.leases.renew("api:f", fresh.token, 30)


async def test_a_released_token_cannot_write(open_storage: Opener) -> None:
    """After a turn released its lease, its token writes nothing, even with nobody else holding it."""
    storage = await open_storage()
    lease = await storage.leases.acquire("api:r", "me", 30)
    await storage.leases.release("api:r", lease.token)
    with pytest.raises(LeaseLostError):
        await storage.sessions.append("api:r", TURN, lease)
    assert await storage.sessions.keys() == set()


async def test_a_cancelled_waiter_leaves_nothing_behind(open_storage: Opener) -> None:
    """A turn cancelled while waiting for its session (client gone) does not hold up the next one."""
    one, two = await open_storage(), await open_storage()
    lease = await one.leases.acquire("api:x", "one", 3600)
    gone = asyncio.create_task(two.leases.acquire("api:x", "gone", 3600))
    nxt = asyncio.create_task(two.leases.acquire("api:x", "next", 3600))
    await tried(one, lease.token + 1)  # "gone" has tried and waits; "next" queues behind it
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await tried(one, lease.token + 2)  # now "next" has tried too
    await one.leases.release("api:x", lease.token)
    second = await asyncio.wait_for(nxt, 30)
    assert await one.leases.holder("api:x") == ("next", second.token)


async def test_a_waiter_cancelled_while_it_starts_listening_closes_that_connection(pg_url: str) -> None:
    """A turn cancelled (its client gone) while its process is still setting up the connection
    that listens for releases closes that connection at once. It stayed open, unreferenced,
    until garbage collection (which then warned about it, and failed an unrelated test)."""
    proxy = StallingProxy(pg_url)
    through_proxy = await proxy.start()
    gc.disable()  # (a collection would close it too, and hide the leak)
    try:
        async with opening(pg_url, 4) as open_one, opening(through_proxy, 4) as open_two:
            one, two = await open_one(), await open_two()
            lease = await one.leases.acquire("api:x", "one", 3600)
            proxy.hold = True
            gone = asyncio.create_task(two.leases.acquire("api:x", "gone", 3600))
            await proxy.held.wait()  # its LISTEN is sent, and gets no answer
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            async with asyncio.timeout(10):  # (a deadline, not a measurement: it closes at once)
                await proxy.closed.wait()
            proxy.hold = False
            await one.leases.release("api:x", lease.token)
    finally:
        gc.enable()
        await proxy.close()


async def test_lease_storage_errors_are_storage_errors(open_storage: Opener) -> None:
    """When the database goes away, lease calls fail with a StorageError, not a driver exception."""
    storage = await open_storage()
    await storage.pool.close()
    with pytest.raises(StorageError, match="session lease"):
        await storage.leases.acquire("api:z", "me", 30)
    await storage.leases.close()


# --------------------------------------------------------------------------- the history cache


def _exchange(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]


async def _turn(store: SessionStore, key: str, text: str) -> list[str]:
    """One turn as the agent runs it: under the lease, read the history, then save the turn."""
    async with store.lock(key):
        history = await store.history(key)
        await store.append_turn(key, _exchange(text))
    return [m["content"] for m in history]


async def test_a_cached_history_sees_another_process_turn(open_storage: Opener) -> None:
    """A session one process has in memory still shows the turn another process added since: the
    cache is only trusted at the version the session had when its lease was taken."""
    one, two = await open_storage(), await open_storage()
    a, b = SessionStore(one.sessions, one.leases), SessionStore(two.sessions, two.leases)
    assert await _turn(a, "api:v", "q1") == []
    assert await _turn(a, "api:v", "q2") == ["q1", "ok"]  # (now in a's memory)
    assert await _turn(b, "api:v", "q3") == ["q1", "ok", "q2", "ok"]
    assert await _turn(a, "api:v", "q4") == ["q1", "ok", "q2", "ok", "q3", "ok"]
    assert await b.delete("api:v")
    assert await _turn(a, "api:v", "fresh") == []  # (deleted elsewhere: not served from memory)
    assert await _turn(b, "api:v", "again") == ["fresh", "ok"]


async def test_an_unchanged_session_is_served_from_memory(open_storage: Opener) -> None:
    """When no other process wrote the session since, its next turn reads nothing from the
    database: a row edited behind the store's back (no new turn, so the same version) is not
    read again."""
    storage = await open_storage()
    store = SessionStore(storage.sessions, storage.leases)
    await _turn(store, "api:m", "q1")
    await storage.pool.execute("UPDATE turns SET data = $1", orjson.dumps(_exchange("edited")))
    assert await _turn(store, "api:m", "q2") == ["q1", "ok"]
    assert await storage.leases.holder("api:m") is None  # (the turn's write gave the lease back)
    fresh = SessionStore(storage.sessions, storage.leases)  # (another process: nothing in memory)
    assert await _turn(fresh, "api:m", "q3") == ["edited", "ok", "q2", "ok"]


async def test_a_turn_costs_two_statements(logged: Callable[[str], int], open_storage: Opener) -> None:
    """A turn on a session costs two round trips on PostgreSQL (it was eight): taking the lease,
    which also reads the session's version, and writing the turn, which also gives the lease
    back; the history comes from memory. Counted in the server's own statement log."""
    storage = await open_storage()
    store = SessionStore(storage.sessions, storage.leases)
    key = "api:counted-7f3a"

    def statements() -> int:  # (each execution logs its parameters, the session key among them)
        return logged(f"'{key}'")

    def resets() -> int:  # (asyncpg's default reset on release: one more round trip each time)
        return logged("pg_advisory_unlock_all()")

    await _turn(store, key, "q1")  # (the first turn also prepares the statements on its connection)
    before, reset_before = statements(), resets()
    await _turn(store, key, "q2")
    await _turn(store, key, "q3")
    assert statements() - before == 4
    assert resets() - reset_before == 0  # (and no reset round trip after each of them)
