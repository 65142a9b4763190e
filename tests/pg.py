"""The PostgreSQL fixtures: one throwaway server per test run, a fresh database per test.

The server (see ``tests/pgserver.py``, shared with the benchmark) is session-scoped. Each test
that asks for ``pg_url`` gets a fresh, empty database on it.

Without the binaries the PostgreSQL tests are skipped, naming what is missing; with
``NANOBOT_REQUIRE_POSTGRES=1`` (``.ci/run`` sets it) they fail instead.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

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
    "StallingProxy",
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


class StallingProxy:
    """A TCP proxy in front of PostgreSQL that, once ``hold`` is set, stops passing on a new
    listening connection's LISTEN: a network that stops answering mid-way. ``closed`` is set
    when the client closes a connection whose LISTEN it held. With ``mute`` set, it drops the
    notifications the server sends (NotificationResponse messages): a process that misses them."""

    def __init__(self, url: str) -> None:
        self._target = urlsplit(url)
        self.hold = False
        self.mute = False
        self.held = asyncio.Event()
        self.closed = asyncio.Event()

    async def start(self) -> str:
        """Listen on a free port; the URL to reach the database through the proxy."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        host = self._target.netloc.rpartition("@")
        return urlunsplit(self._target._replace(netloc=f"{host[0]}@127.0.0.1:{port}"))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._target.hostname, self._target.port)
        back = asyncio.create_task(self._pump(up_reader, writer))
        held = False
        try:
            while data := await reader.read(65536):
                if self.hold and b"LISTEN" in data:
                    held = True
                    self.held.set()
                    continue
                up_writer.write(data)
        finally:
            if held:
                self.closed.set()
            back.cancel()
            up_writer.close()
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self.mute and data[:1] == b"A":  # (a notification comes in a read of its own)
                continue
            writer.write(data)
        writer.close()  # the server closed: so does the client's side

    async def close(self) -> None:
        self._server.close()
