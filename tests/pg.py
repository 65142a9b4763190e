"""The PostgreSQL fixtures: one throwaway server per test run, a fresh database per test.

The server (see ``tests/pgserver.py``, shared with the benchmark) is session-scoped. Each test
that asks for ``pg_url`` gets a fresh, empty database on it.

Without the binaries the PostgreSQL tests are skipped, naming what is missing; with
``NANOBOT_REQUIRE_POSTGRES=1`` (``.ci/run`` sets it) they fail instead.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from nanobot.storage.postgres import PgStorage
from nanobot.storage_config import StorageConfig
from pgserver import (
    _QUOTED_PASSWORD,
    PASSWORD,
    USER,
    PgServer,
    create_database,
    missing,
    start_server,
    stop_server,
)

__all__ = [
    "PASSWORD",
    "USER",
    "_QUOTED_PASSWORD",
    "Opener",
    "PgServer",
    "logged",
    "opening",
    "pg_server",
    "pg_url",
    "start_server",
    "stop_server",
]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The test run's PostgreSQL server (skipped, or failed when required, if it cannot start)."""
    why = missing()
    if why is not None:
        if os.environ.get("NANOBOT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL tests required (NANOBOT_REQUIRE_POSTGRES=1) but {why}")
        pytest.skip(why)
    server = start_server()
    atexit.register(stop_server, server)  # (also when the run is interrupted before teardown)
    try:
        yield server
    finally:
        stop_server(server)
        atexit.unregister(stop_server)


_databases = itertools.count(1)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A ``postgresql://`` URL (with a password) of a fresh, empty database on the test server.

    Created with ``createdb`` over the server's unix socket: a plain fixture, usable from
    ``request.getfixturevalue`` in the backend-parametrized fixtures.
    """
    return create_database(pg_server, f"test_{os.getpid()}_{next(_databases)}")


Opener = Callable[[], Awaitable[PgStorage]]


@contextlib.asynccontextmanager
async def opening(url: str, pool_size: int) -> AsyncIterator[Opener]:
    """Opens ``PgStorage``s ("processes": each its own pool and listener) on one database; closes
    them all at the end."""
    opened: list[PgStorage] = []

    async def open_one() -> PgStorage:
        storage = await PgStorage.open(StorageConfig(url=url, pool_size=pool_size))
        opened.append(storage)
        return storage

    try:
        yield open_one
    finally:
        for storage in opened:
            if not storage.pool.is_closing():
                await storage.close()


@pytest.fixture
async def logged(pg_server: PgServer, pg_url: str) -> Callable[[str], int]:
    """Every statement the server runs on ``pg_url``'s database is logged (from the next
    connection on); counts the occurrences of a text in the server's log."""
    import asyncpg

    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"ALTER DATABASE \"{pg_url.rsplit('/', 1)[1]}\" SET log_statement = 'all'")
    finally:
        await admin.close()
    return lambda text: pg_server.log.read_text(errors="replace").count(text)
