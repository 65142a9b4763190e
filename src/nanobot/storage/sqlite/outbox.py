"""The durable outbox on SQLite: every message for a chat platform, stored before it is sent
(the values, states and the Protocol: :mod:`nanobot.storage.outbox`).

The file is ``<workspace>/outbox.db`` in WAL mode. All SQLite work runs on one dedicated
writer thread, never on the event loop. The thread does *group commit*: it takes every
job queued while the previous transaction ran and commits them together, so a burst of
1,000 messages costs a handful of transactions, not 1,000 — and the async side
resolves a whole batch with one loop wake-up.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import orjson

from nanobot.errors import StorageError
from nanobot.health import StorageHealth
from nanobot.storage.outbox import DELIVERED_KEEP_SECONDS, NewMessage, OutboxEntry, State
from nanobot.storage.sqlite.writer import SqliteWriter, WriterOptions

log = logging.getLogger(__name__)

T = TypeVar("T")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    uid         TEXT    NOT NULL,
    channel     TEXT    NOT NULL,
    chat_id     TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    content     TEXT    NOT NULL,
    metadata    TEXT    NOT NULL DEFAULT '{}',
    state       TEXT    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    parts_done  INTEGER NOT NULL DEFAULT 0,
    created_at  REAL    NOT NULL,
    updated_at  REAL    NOT NULL,
    next_at     REAL    NOT NULL,
    last_error  TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox (state, channel);
"""

_COLUMNS = (
    "id, uid, channel, chat_id, kind, content, metadata, state, attempts, parts_done, "
    "created_at, updated_at, next_at, last_error"
)


# --------------------------------------------------------------------------- synchronous core


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the outbox database in WAL mode, in autocommit mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a process crash (SIGKILL); only an OS crash or
    # power loss can roll back the last transactions. FULL would fsync on every commit.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(_SCHEMA)
    return conn


def insert(conn: sqlite3.Connection, messages: Iterable[NewMessage], now: float) -> list[OutboxEntry]:
    """Insert ``messages`` (pending, or held when their channel is disabled)."""
    out: list[OutboxEntry] = []
    sql = (
        "INSERT INTO outbox (uid, channel, chat_id, kind, content, metadata, state, "
        "created_at, updated_at, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    for m in messages:
        uid = uuid.uuid4().hex[:16]
        state = State.HELD if m.held else State.PENDING
        meta = orjson.dumps(m.metadata).decode()
        cur = conn.execute(sql, (uid, m.channel, m.chat_id, m.kind, m.content, meta, state, now, now, now))
        assert cur.lastrowid is not None
        out.append(
            OutboxEntry(cur.lastrowid, uid, m.channel, m.chat_id, m.kind, m.content, m.metadata, state,
                        created_at=now, updated_at=now, next_at=now)
        )  # fmt: skip
    return out


def save(conn: sqlite3.Connection, entry: OutboxEntry) -> None:
    """Write back an entry's delivery progress."""
    conn.execute(
        "UPDATE outbox SET state = ?, attempts = ?, parts_done = ?, updated_at = ?, next_at = ?, "
        "last_error = ? WHERE id = ?",
        (entry.state, entry.attempts, entry.parts_done, entry.updated_at, entry.next_at, entry.last_error,
         entry.id),
    )  # fmt: skip


def recover(
    conn: sqlite3.Connection, enabled: frozenset[str], held_max_age: float, now: float
) -> list[OutboxEntry]:
    """At start: settle held and pending entries for the channels now enabled; return the pending ones.

    Held entries of enabled channels become pending, or ``expired`` when older than
    ``held_max_age``; pending entries of channels no longer enabled become held.
    """
    names = sorted(enabled)
    marks = ",".join("?" * len(names))
    conn.execute(
        f"UPDATE outbox SET state = 'expired', updated_at = ?, last_error = 'held too long' "
        f"WHERE state = 'held' AND created_at < ? AND channel IN ({marks})",
        (now, now - held_max_age, *names),
    )
    conn.execute(
        f"UPDATE outbox SET state = 'pending', updated_at = ?, next_at = ? "
        f"WHERE state = 'held' AND channel IN ({marks})",
        (now, now, *names),
    )
    conn.execute(
        f"UPDATE outbox SET state = 'held', updated_at = ? "
        f"WHERE state = 'pending' AND channel NOT IN ({marks})",
        (now, *names),
    )
    conn.execute(
        "DELETE FROM outbox WHERE state = 'delivered' AND updated_at < ?", (now - DELIVERED_KEEP_SECONDS,)
    )
    rows = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE state = 'pending' ORDER BY id").fetchall()
    return [OutboxEntry.from_row(row) for row in rows]


_WAITING = (State.PENDING, State.HELD, State.FAILED, State.EXPIRED)


def count_waiting(conn: sqlite3.Connection) -> dict[str, int]:
    """How many entries are in each state but ``delivered`` (those are kept a week: counting
    them would make every scrape read a week of rows; the index makes the others cheap)."""
    counts = dict.fromkeys(map(str, _WAITING), 0)
    marks = ",".join("?" * len(_WAITING))
    sql = f"SELECT state, COUNT(*) FROM outbox WHERE state IN ({marks}) GROUP BY state"
    counts.update(conn.execute(sql, [str(s) for s in _WAITING]).fetchall())
    return counts


def select(conn: sqlite3.Connection, states: Iterable[State] | None = None) -> list[OutboxEntry]:
    """Entries in ``states`` (all when None), oldest first."""
    if states is None:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id").fetchall()
    else:
        wanted = [str(s) for s in states]
        marks = ",".join("?" * len(wanted))
        sql = f"SELECT {_COLUMNS} FROM outbox WHERE state IN ({marks}) ORDER BY id"
        rows = conn.execute(sql, wanted).fetchall()
    return [OutboxEntry.from_row(row) for row in rows]


# --------------------------------------------------------------------------- the SQLite store


class OutboxStore:
    """The SQLite :class:`Outbox`: every call runs on the shared writer thread
    (:mod:`nanobot.storage.sqlite.writer`), batched into transactions."""

    def __init__(self, path: Path, health: StorageHealth | None = None) -> None:
        self.path = path
        # BEGIN IMMEDIATE: `nanobot outbox retry|drop` write this file from another process.
        options = WriterOptions(name="nanobot-outbox", what=f"the outbox {path}", immediate=True)
        self._writer = SqliteWriter(lambda: connect(path), options, health or StorageHealth("outbox"))

    async def open(self) -> None:
        """Open the database (on the writer thread) and start taking jobs."""
        await self._writer.open()

    @property
    def is_open(self) -> bool:
        """True between ``open`` and ``close``."""
        return self._writer.is_open

    async def close(self) -> None:
        """Finish every queued job, then close the database; safe to call twice."""
        await self._writer.close()

    def submit(self, job: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``job`` for the writer thread; the future resolves once its transaction commits."""
        return self._writer.submit(job)

    async def add(self, messages: list[NewMessage]) -> list[OutboxEntry]:
        """Store new messages; returns once they are committed."""
        return await self.submit(lambda conn: insert(conn, messages, time.time()))

    def save_soon(self, entry: OutboxEntry) -> asyncio.Future[None]:
        """Write back ``entry`` (a snapshot of it) without waiting for the commit."""
        snapshot = OutboxEntry(**{name: getattr(entry, name) for name in OutboxEntry.__slots__})
        fut = self.submit(lambda conn: save(conn, snapshot))
        fut.add_done_callback(_log_failure)
        return fut

    async def recover(self, enabled: frozenset[str], held_max_age: float) -> list[OutboxEntry]:
        """See :func:`recover` (a damaged file fails here, at start: named, as a StorageError)."""
        try:
            return await self.submit(lambda conn: recover(conn, enabled, held_max_age, time.time()))
        except StorageError as exc:  # ("the outbox PATH: cause", from the writer)
            raise StorageError(f"cannot read {exc}") from None

    async def pending_before(self, lanes: list[tuple[str, str]], before: int) -> list[OutboxEntry]:
        """None: this process is the only one that stores messages in this file (the workspace
        lock), and it queues each one it stores."""
        return []

    async def counts(self) -> dict[str, int]:
        """See :func:`count_waiting` (on the writer thread, like every other read)."""
        return await self.submit(count_waiting)


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("outbox: could not save delivery progress: %s", fut.exception())
