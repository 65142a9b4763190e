"""The PostgreSQL fixtures: one throwaway server per test run, a fresh database per test.

The server (see ``tests/pgserver.py``, shared with the benchmark) is session-scoped. Each test
that asks for ``pg_url`` gets a fresh, empty database on it.

Without the binaries the PostgreSQL tests are skipped, naming what is missing; with
``NANOBOT_REQUIRE_POSTGRES=1`` (``.ci/run`` sets it) they fail instead.
"""

from __future__ import annotations

import atexit
import itertools
import os
from collections.abc import Iterator

import pytest

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
    "PgServer",
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
