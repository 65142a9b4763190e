"""The session database: SQLite in WAL mode behind the shared writer thread with group commit.

Jobs are batched on the event loop and handed to the thread one batch at a time; a batch's
turns are one INSERT (see :data:`.session_table.TURN_LOG`). The thread never dies
of a failing job: every waiter gets its result or a ``StorageError``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import orjson

from nanobot.errors import StorageError
from nanobot.health import StorageHealth
from nanobot.storage.base import ChatMessage, Lease, SessionInfo, damaged_data
from nanobot.storage.sqlite import session_table
from nanobot.storage.sqlite.writer import RowInsert, SqliteWriter, WriterOptions
from nanobot.workspace import prepare as prepare_workspace

# One row per turn (its messages as one JSON array): a turn is written, and read back,
# as the unit it is — one INSERT per request instead of one per message.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    session TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_session ON turns (session, id);
"""


_INSERT = session_table.INSERT_TURNS
_ROWS_PER_INSERT = 190  # 950 parameters: under SQLite's oldest limit (999)


class SqliteBackend:
    """The sessions file in WAL mode, written through the shared group-commit writer thread
    (:mod:`nanobot.storage.sqlite.writer`): a turn is one row of a multi-row INSERT.

    The connection holds the file in exclusive locking mode: the workspace lock already
    makes this process its only user, and without the per-transaction file locks and
    shared-memory index a commit costs a third of the system calls.
    """

    def __init__(self, path: Path, health: StorageHealth | None = None) -> None:
        self._path = path
        options = WriterOptions(
            name="nanobot-sessions-db",
            what=f"the session database {path}",
            rows=RowInsert(_INSERT, 5, _ROWS_PER_INSERT),
            translate=_damaged,
            loop_commits=True,
        )
        self._writer = SqliteWriter(self._connect, options, health or StorageHealth("sessions"))

    async def open(self) -> None:
        """Create the workspace and open (or create, or migrate) the file, on the writer thread."""
        prepare_workspace(self._path.parent)
        await self._writer.open()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no -shm file, no fcntl per commit
            db.execute("PRAGMA journal_mode=WAL")  # the first read: "file is not a database" is raised here
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            session_table.migrate(db)
            db.executescript(session_table.TURN_LOG)
        except sqlite3.Error:
            db.close()
            raise
        return db

    async def _call(self, job: Callable[[sqlite3.Connection], Any]) -> Any:
        return await self._writer.submit(job)

    # -- the interface
    async def keys(self) -> set[str]:
        """Every session key that has history (read at start: a damaged file fails here, named)."""
        try:
            rows: list[tuple[str]] = await self._call(
                lambda db: db.execute("SELECT key FROM sessions").fetchall()
            )
        except StorageError as exc:
            raise StorageError(f"cannot read {exc}") from exc.__cause__
        return {r[0] for r in rows}

    async def load(self, key: str, limit: int) -> list[ChatMessage]:
        """The last ``limit`` turns of ``key`` (so at least ``limit`` messages), oldest first."""

        def job(db: sqlite3.Connection) -> list[tuple[bytes]]:
            sql = "SELECT data FROM turns WHERE session = ? ORDER BY id DESC LIMIT ?"
            return db.execute(sql, (key, limit)).fetchall()

        rows: list[tuple[bytes]] = await self._call(job)
        with damaged_data():
            return [m for r in reversed(rows) for m in orjson.loads(r[0])]

    def append(
        self, key: str, messages: Sequence[ChatMessage], lease: Lease | None = None
    ) -> asyncio.Future[None]:
        """Add one turn's messages to ``key``; the future resolves once they are committed
        (no lease here: this process is the file's only writer)."""
        # A bytearray binds as a blob directly; bytes go through sqlite3's adapter lookup first
        # (two attribute misses, each an AttributeError built and dropped: ~3k instructions).
        data = bytearray(orjson.dumps(messages))
        now = time.time()
        title, preview = session_table.summarize(messages)
        return self._writer.submit_row((key, data, title, now, preview))

    async def page(self, prefix: str, limit: int, after: str | None) -> tuple[list[SessionInfo], bool] | None:
        """See :meth:`SessionBackend.page`."""
        return cast(
            "tuple[list[SessionInfo], bool] | None",
            await self._call(lambda db: session_table.page(db, prefix, limit, after)),
        )

    async def read(
        self, key: str, max_messages: int, max_bytes: int
    ) -> tuple[SessionInfo, list[ChatMessage], bool] | None:
        """See :meth:`SessionBackend.read`."""
        return cast(
            "tuple[SessionInfo, list[ChatMessage], bool] | None",
            await self._call(lambda db: session_table.history(db, key, max_messages, max_bytes)),
        )

    async def rename(self, key: str, title: str) -> SessionInfo | None:
        """See :meth:`SessionBackend.rename`."""
        return cast("SessionInfo | None", await self._call(lambda db: session_table.rename(db, key, title)))

    async def delete(self, key: str) -> bool:
        """See :meth:`SessionBackend.delete`."""
        return bool(await self._call(lambda db: session_table.delete(db, key)))

    async def close(self) -> None:
        """Finish queued and pending writes and stop the database thread."""
        await self._writer.close()


def _damaged(exc: BaseException) -> BaseException:
    """A job's own failure (damaged data shows up as ValueError) as the StorageError callers handle."""
    if isinstance(exc, StorageError):
        return exc
    error = StorageError(f"damaged data in the session database ({type(exc).__name__}: {exc})")
    error.__cause__ = exc
    return error
