"""Reaching PostgreSQL: the connection pool, and driver errors translated into StorageError.

Every message that leaves here names the database without its credentials (``safe_url``) and
has the URL's password removed, even where no :func:`nanobot.redact.secrets_redacted` is active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg

from nanobot.config import safe_url
from nanobot.errors import StorageError
from nanobot.redact import REDACTED, redact, url_passwords
from nanobot.storage_config import StorageConfig

# What the driver raises for an unreachable, refusing or failing server. (InternalClientError: a
# kept connection whose server side was terminated while it was idle, on its next statement.)
DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


def describe(url: str) -> str:
    """The database's address for messages: ``postgresql://host:port/db``, no user or password."""
    return safe_url(url)


def reason(exc: BaseException, url: str) -> str:
    """A one-line cause for ``exc`` with every secret (and the URL's password) removed."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    elif isinstance(exc, TimeoutError):
        text = "timed out"
    elif isinstance(exc, asyncpg.PostgresError) and getattr(exc, "message", None):
        # The server's message alone: its DETAIL may quote the row, i.e. the conversation's text.
        text = str(exc.message)
    else:
        text = str(exc) or type(exc).__name__
    for password in url_passwords(url):
        text = text.replace(password, REDACTED)
    return redact(" ".join(text.split()))


@contextlib.contextmanager
def storage_errors(doing: str, url: str) -> Iterator[None]:
    """Turn a driver error raised inside into a :class:`StorageError` saying what failed."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise StorageError(f"{doing} (PostgreSQL {describe(url)}): {reason(exc, url)}") from None


async def _no_session_state(_conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool: pooled connections never LISTEN,
    SET, open cursors outside a transaction or hold session advisory locks (leadership and
    listeners use dedicated connections; the migration lock is released explicitly). asyncpg's
    default reset (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``) is one
    more round trip for every statement run through the pool. (An open transaction is still
    rolled back by asyncpg itself.)"""


async def create_pool(config: StorageConfig) -> asyncpg.Pool:
    """A pool of up to ``storage.poolSize`` connections; a StorageError naming the cause if the
    server cannot be reached within ``storage.connectTimeout``."""
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            config.url,
            min_size=1,
            max_size=config.pool_size,
            timeout=config.connect_timeout,
            reset=_no_session_state,
        )
    except (*DRIVER_ERRORS, ValueError) as exc:  # (ValueError: a malformed URL)
        raise StorageError(f"cannot open {describe(config.url)}: {reason(exc, config.url)}") from None
    return pool


async def listening(
    url: str, connect_timeout: float, channel: str, on_notify: Callable[..., Any], on_lost: Callable[..., Any]
) -> asyncpg.Connection:
    """A dedicated connection that LISTENs on ``channel``. Closed again if anything after the
    connect fails, or the caller is cancelled meanwhile (a client that leaves mid-wait): it
    would stay open until garbage collection otherwise. Driver errors are the caller's."""
    conn: asyncpg.Connection = await asyncpg.connect(url, timeout=connect_timeout)
    try:
        await conn.add_listener(channel, on_notify)
    except BaseException:
        conn.terminate()
        raise
    # Lost notifications cost at most a re-read: the callers also look again on a timer.
    conn.add_termination_listener(on_lost)
    return conn
