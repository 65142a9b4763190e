"""The session database: SQLite in WAL mode behind one writer thread with group commit.

Jobs are batched on the event loop and handed to the thread one batch at a time; a batch's
turns are one INSERT (see :data:`nanobot.session_table.TURN_LOG`). The thread never dies
of a failing job: every waiter gets its result or a ``sqlite3.Error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson

from nanobot import session_table
from nanobot.errors import StorageError
from nanobot.health import StorageHealth
from nanobot.session_table import SessionInfo
from nanobot.workspace import prepare as prepare_workspace

if TYPE_CHECKING:
    from nanobot.sessions import ChatMessage

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


_Job = Callable[[sqlite3.Connection], object]
# (session, data, title, time, preview): a turn to insert and its session's row to update;
# consecutive rows batch into one INSERT (see session_table.TURN_LOG).
_Row = tuple[str, bytes, str, float, str]
_Batch = list[tuple[_Job | _Row, "asyncio.Future[object]"]]
_Results = list[tuple["asyncio.Future[object]", object, BaseException | None]]
_STOP = object()
_INSERT = session_table.INSERT_TURNS
_ROWS_PER_INSERT = 190  # 950 parameters: under SQLite's oldest limit (999)


class SqliteBackend:
    """SQLite in WAL mode, driven by one dedicated thread that batches commits.

    Group commit is decided on the event loop: jobs submitted while a batch is being
    committed wait (in memory, on the loop) and go to the thread together as the next batch,
    so the thread is woken once per batch, not once per turn. Every thread hop costs two
    context switches and a fight for the GIL; under load that was most of the gateway's cost.
    For the same reason a batch costs the thread as few SQLite calls as it can (each one
    releases the GIL and must win it back): its turns are one multi-row INSERT, and a batch
    of one statement runs without BEGIN/COMMIT (a statement is its own transaction).

    The connection holds the file in exclusive locking mode: the workspace lock already
    makes this process its only user, and without the per-transaction file locks and
    shared-memory index a commit costs a third of the system calls.
    """

    def __init__(self, path: Path, health: StorageHealth | None = None) -> None:
        prepare_workspace(path.parent)
        self._path = path
        self._health = health or StorageHealth("sessions")  # flipped by the thread, for /health/ready
        self._jobs: queue.SimpleQueue[object] = queue.SimpleQueue()  # _Batch or _STOP
        self._loop = asyncio.get_running_loop()
        self._broken: StorageError | None = None  # set (on the loop) when the file cannot be opened
        self._pending: _Batch = []  # submitted, not yet handed to the thread (loop side)
        self._busy = False  # a batch is with the thread: the next one waits for its results
        self._thread = threading.Thread(target=self._run, name="nanobot-sessions-db", daemon=True)
        self._thread.start()

    # -- the database thread
    def _run(self) -> None:
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            # Every job fails with the reason, so an awaiting caller never hangs on a dead thread.
            self._refuse_all(self._storage_error("cannot open", exc))
            return
        self._health.opened()
        jobs = self._jobs
        try:
            while True:
                item = jobs.get()
                if item is _STOP:
                    return
                batch = cast(_Batch, item)
                try:
                    results = self._run_batch(db, batch)
                except Exception as exc:  # never let the thread die: every waiter would hang
                    failure = _as_db_error(exc)
                    results = [(fut, None, failure) for _job, fut in batch]
                self._loop.call_soon_threadsafe(self._done, results)
        finally:
            self._health.closed()
            db.close()

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

    def _storage_error(self, doing: str, exc: sqlite3.Error) -> StorageError:
        return StorageError(f"{doing} the session database {self._path}: {exc}")

    def _refuse_all(self, error: StorageError) -> None:
        """The database could not be opened: from now on every job fails with ``error``.

        Decided on the loop thread, where jobs are submitted: whatever is queued or pending by
        then is failed there, and every later job at once, so no caller waits on a thread that
        is gone.
        """

        def refuse() -> None:
            self._broken = error
            batch, self._pending = self._pending, []
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._jobs.get_nowait()
                    if item is not _STOP:
                        batch.extend(cast(_Batch, item))
            _settle([(fut, None, error) for _job, fut in batch])

        self._loop.call_soon_threadsafe(refuse)

    def _run_batch(self, db: sqlite3.Connection, batch: _Batch) -> _Results:
        """Run a batch of jobs in one transaction; each job's result or error (and the store's
        health for /health/ready)."""
        results = _run_batch(db, batch)
        if any(exc is not None for _, _, exc in results):
            self._health.failed()
        else:
            self._health.succeeded()
        return results

    # -- the loop side
    def _done(self, results: _Results) -> None:
        """A batch came back: settle its futures, then hand over what queued up meanwhile."""
        self._busy = False
        _settle(results)
        self._flush()

    def _flush(self) -> None:
        if self._busy or not self._pending or self._broken is not None:
            return
        batch, self._pending = self._pending, []
        self._busy = True
        self._jobs.put(batch)

    def _submit(self, job: _Job | _Row) -> asyncio.Future[object]:
        fut: asyncio.Future[object] = self._loop.create_future()
        if self._broken is not None:
            fut.set_exception(self._broken)
            return fut
        self._pending.append((job, fut))
        if not self._busy:
            self._flush()
        return fut

    async def _call(self, job: _Job) -> Any:
        return await self._submit(job)

    # -- the interface
    async def keys(self) -> set[str]:
        """Every session key that has history (read at start: a damaged file fails here, named)."""
        try:
            rows: list[tuple[str]] = await self._call(
                lambda db: db.execute("SELECT key FROM sessions").fetchall()
            )
        except sqlite3.Error as exc:
            raise self._storage_error("cannot read", exc) from None
        return {r[0] for r in rows}

    async def load(self, key: str, limit: int) -> list[ChatMessage]:
        """The last ``limit`` turns of ``key`` (so at least ``limit`` messages), oldest first."""

        def job(db: sqlite3.Connection) -> list[tuple[bytes]]:
            sql = "SELECT data FROM turns WHERE session = ? ORDER BY id DESC LIMIT ?"
            return db.execute(sql, (key, limit)).fetchall()

        rows: list[tuple[bytes]] = await self._call(job)
        return [m for r in reversed(rows) for m in orjson.loads(r[0])]

    def append(self, key: str, messages: Sequence[ChatMessage]) -> asyncio.Future[object]:
        """Add one turn's messages to ``key``; the future resolves once they are committed."""
        data = orjson.dumps(messages)
        now = time.time()
        title, preview = session_table.summarize(messages)
        return self._submit((key, data, title, now, preview))

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
        if self._pending and self._broken is None:
            batch, self._pending = self._pending, []
            self._jobs.put(batch)  # after the batch in flight, if any: the thread keeps the order
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)


def _run_batch(db: sqlite3.Connection, batch: _Batch) -> _Results:
    """Run a batch of jobs in one transaction; each job's result or error."""
    steps = _steps(batch)
    if len(steps) == 1:  # one statement: its own transaction
        return _run_step(db, steps[0])
    try:
        db.execute("BEGIN")
    except sqlite3.Error as exc:  # (a disk error): every job in the batch learns it
        return [(fut, None, exc) for _job, fut in batch]
    results: _Results = []
    for step in steps:
        results.extend(_run_step(db, step))
    try:
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        results = [(fut, None, exc) for fut, _, _ in results]
        if db.in_transaction:  # (a failed COMMIT may leave it open: the next BEGIN would fail too)
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
    return results


def _steps(batch: _Batch) -> list[_Batch]:
    """The batch as statements, in order: each job alone, consecutive rows together."""
    steps: list[_Batch] = []
    for item in batch:
        last = steps[-1] if steps else None
        if (
            isinstance(item[0], tuple)
            and last is not None
            and isinstance(last[0][0], tuple)
            and len(last) < _ROWS_PER_INSERT
        ):
            last.append(item)
        else:
            steps.append([item])
    return steps


def _run_step(db: sqlite3.Connection, step: _Batch) -> _Results:
    """One statement: a job, or one INSERT of consecutive rows (they succeed or fail together)."""
    first = step[0][0]
    if isinstance(first, tuple):
        return _insert_turns(db, step)
    # A job of several statements (a delete: the session's row, then its turns) is all or
    # nothing: a savepoint (in a batch of one it is the transaction itself).
    try:
        db.execute("SAVEPOINT job")
        try:
            result = first(db)
        except Exception:
            db.execute("ROLLBACK TO job")
            raise
        finally:
            db.execute("RELEASE job")
    except Exception as exc:  # damaged data (a turn that is not JSON) too: a clean error, not a dead thread
        return [(fut, None, _as_db_error(exc)) for _job, fut in step]
    return [(step[0][1], result, None)]


def _as_db_error(exc: BaseException) -> sqlite3.Error:
    """``exc`` as the sqlite3 error callers handle (damaged data shows up as ValueError)."""
    if isinstance(exc, sqlite3.Error):
        return exc
    return sqlite3.DatabaseError(f"damaged data in the session database ({type(exc).__name__}: {exc})")


def _insert_turns(db: sqlite3.Connection, step: _Batch) -> _Results:
    """Consecutive turns: one INSERT into the ``turn_log`` view, whose trigger writes each turn
    and its session's row (one statement: all or none)."""
    try:
        params = [value for row, _fut in step for value in cast(_Row, row)]
        db.execute(_INSERT + ",".join(["(?, ?, ?, ?, ?)"] * len(step)), params)
    except sqlite3.Error as exc:
        return [(fut, None, exc) for _row, fut in step]
    return [(fut, None, None) for _row, fut in step]


def _settle(results: _Results) -> None:
    for fut, value, exc in results:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
