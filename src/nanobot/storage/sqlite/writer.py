"""One SQLite writer thread with group commit, shared by every embedded store (sessions, outbox).

Jobs are submitted on the event loop and handed to the thread one batch at a time: what is
submitted while a batch commits waits on the loop and goes as the next batch, so the thread is
woken once per batch (a hop costs two context switches and a fight for the GIL). A batch costs
the thread as few SQLite calls as it can (each releases the GIL and must win it back): consecutive
rows (:meth:`SqliteWriter.submit_row`) become one multi-row INSERT, and a batch of one statement
runs without BEGIN/COMMIT unless the store asks for ``BEGIN IMMEDIATE`` (other programs write).

With ``WriterOptions.loop_commits`` rows that find the thread idle are committed on the event
loop, no hand-off (two thread wake-ups were half of what storing a turn added to a quiet
server's latency): a WAL append without fsync (``synchronous=NORMAL``), a page-cache write like
a log line. What can block stays on the thread: jobs, batches that arrive while it is busy, and
the WAL checkpoints (they fsync), which it runs every ~1,000 frames (``wal_autocheckpoint=0``).

Each job runs in a savepoint, so one failing job spares the rest of its batch. The thread never
dies of a failing job: every waiter gets its result or an exception, and an acknowledged job
(its future resolved) is committed. SQLite's errors reach the waiters as
:class:`~nanobot.errors.StorageError` naming the store (``raise ... from`` the sqlite3 error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from nanobot.errors import StorageError
from nanobot.health import StorageHealth

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]
Row = tuple[object, ...]
_Batch = list[tuple[Job | Row, "asyncio.Future[Any]"]]
_Results = list[tuple["asyncio.Future[Any]", object, BaseException | None]]
_STOP = object()
_CHECKPOINT = object()
CHECKPOINT_FRAMES = 1000  # WAL frames between checkpoints: SQLite's own default (wal_autocheckpoint)


@dataclass(frozen=True, slots=True)
class RowInsert:
    """How :meth:`SqliteWriter.submit_row` rows are written: ``sql`` ends in ``VALUES ``;
    consecutive rows of one batch become one statement of up to ``per_insert`` rows."""

    sql: str
    width: int
    per_insert: int

    def statement(self, rows: int) -> str:
        """The INSERT for ``rows`` rows."""
        one = "(" + ", ".join("?" * self.width) + ")"
        return self.sql + ",".join([one] * rows)


def _unchanged(exc: BaseException) -> BaseException:
    return exc


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """What differs between the stores sharing the writer."""

    name: str  # the thread's name
    what: str  # the store in messages: "the session database /path"
    immediate: bool = False  # BEGIN IMMEDIATE around every batch (the file has other writers)
    rows: RowInsert | None = None
    max_batch: int = 512  # jobs per transaction: bounds how long one commit keeps the others waiting
    loop_commits: bool = False  # rows committed on the event loop while the thread is idle (see above)
    # A failed job's exception (other than sqlite3's) as its awaiter sees it (damaged data: StorageError).
    translate: Callable[[BaseException], BaseException] = _unchanged


class SqliteWriter:
    """A SQLite connection owned by one thread that commits what the event loop submits, in batches."""

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], options: WriterOptions, health: StorageHealth
    ) -> None:
        self._connect = connect
        self._options = options
        self._health = health  # flipped after each batch, for /health/ready
        self._jobs: queue.SimpleQueue[object] = queue.SimpleQueue()  # _Batch or _STOP
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pending: _Batch = []  # submitted, not yet handed to the thread (loop side)
        self._jobs_pending = 0  # of those, jobs (not rows): a batch of rows alone takes the fast path
        self._busy = False  # a batch (or checkpoint) is with the thread, or rows wait for the loop's commit
        self._statements: dict[int, str] = {}  # the multi-row INSERT by row count
        self._db: sqlite3.Connection | None = None  # (the loop uses it only while the thread is idle)
        self._rows_since_checkpoint = 0
        self._frames_per_row = 8.0  # learnt from each checkpoint (how many frames its rows wrote)

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._thread is not None

    async def open(self) -> None:
        """Start the thread and connect on it; a StorageError naming the store when that fails."""
        if self._thread is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._busy = False  # (a checkpoint asked for as the last thread stopped never came back)
        connected: asyncio.Future[None] = loop.create_future()
        thread = threading.Thread(target=self._run, args=(connected,), name=self._options.name, daemon=True)
        thread.start()
        try:
            await connected
        except OSError as exc:
            raise StorageError(f"cannot open {self._options.what}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {self._options.what}: {exc}") from None
        self._thread = thread
        self._health.opened()

    async def close(self) -> None:
        """Finish every submitted job, then close the connection; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._db = None  # the thread's again, until it closes it
        pending, self._pending = self._pending, []
        if pending:
            self._jobs.put((False, pending))  # after the batch in flight, if any: the thread keeps the order
        self._jobs.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._health.closed()

    def submit(self, job: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``job``; the future resolves with its result once its transaction commits."""
        return cast("asyncio.Future[T]", self._submit(job))

    def submit_row(self, row: Row) -> asyncio.Future[None]:
        """Queue one row for :attr:`WriterOptions.rows`; resolves once committed."""
        # (``_submit`` inlined: this is every turn's write)
        if self._thread is None or self._loop is None:
            raise RuntimeError(f"{self._options.what} is not open")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pending.append((row, fut))
        if not self._busy:
            if self._options.loop_commits:
                # Two loop steps on, with the turns finishing meanwhile (c=16: 2.8 pwrite64 per turn, not 4.2)
                self._busy = True
                self._loop.call_soon(self._loop.call_soon, self._flush_here)
            else:
                self._flush()
        return fut

    def _submit(self, item: Job | Row) -> asyncio.Future[Any]:
        if self._thread is None or self._loop is None:
            raise RuntimeError(f"{self._options.what} is not open")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((item, fut))
        self._jobs_pending += 1
        if not self._busy:
            self._flush()
        return fut

    # -- the loop side
    def _flush_here(self) -> None:
        self._busy = False
        self._flush(here=True)

    def _flush(self, here: bool = False) -> None:
        pending = self._pending
        if self._busy or not pending or self._thread is None:
            return
        limit = self._options.max_batch
        if len(pending) > limit:
            batch, self._pending = pending[:limit], pending[limit:]
        else:
            batch, self._pending = pending, []
        rows = self._options.rows
        # Rows alone, one INSERT's worth, no BEGIN IMMEDIATE: every turn's batch. The thread then
        # runs one statement and no Python per row, and the results come back as one outcome.
        fast = (
            not self._jobs_pending
            and rows is not None
            and not self._options.immediate
            and len(batch) <= rows.per_insert
        )
        if self._jobs_pending:
            self._jobs_pending = sum(not isinstance(item, tuple) for item, _fut in self._pending)
        self._busy = True
        if fast and here and self._db is not None:  # the thread is idle: no hand-off
            self._rows_done(batch, self._insert_batch(self._db, batch))
            return
        self._jobs.put((fast, batch))

    def _done(self, results: _Results) -> None:
        """A batch came back: settle its futures, then hand over what queued up meanwhile."""
        self._busy = False
        _settle(results)
        self._flush()

    def _rows_done(self, batch: _Batch, error: BaseException | None) -> None:
        """A batch of rows (one INSERT) came back: all committed, or all failed with ``error``."""
        self._busy = False
        if error is None:
            for _row, fut in batch:
                if not fut.done():
                    fut.set_result(None)
        else:
            for _row, fut in batch:
                if not fut.done():
                    fut.set_exception(self._failure(error))
        if self._options.loop_commits and error is None:
            self._rows_since_checkpoint += len(batch)
            if self._rows_since_checkpoint * self._frames_per_row >= CHECKPOINT_FRAMES:
                self._busy = True  # what comes meanwhile waits, as it waited for SQLite's own checkpoint
                self._jobs.put(_CHECKPOINT)
                return
        self._flush()

    def _checkpointed(self, frames: int | None) -> None:
        """A checkpoint came back: ``frames`` the WAL held (None: it failed, and was logged)."""
        self._busy = False
        rows, self._rows_since_checkpoint = self._rows_since_checkpoint, 0
        if frames and rows:
            self._frames_per_row = max(frames / rows, 0.5)
        self._flush()

    # -- the thread
    def _run(self, connected: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        opened: _Results
        try:
            db = self._connect()
            if self._options.loop_commits:  # checkpoints are the thread's, never in a commit on the loop
                db.execute("PRAGMA wal_autocheckpoint=0")
        except (OSError, sqlite3.Error) as exc:
            opened = [(connected, None, exc)]
            loop.call_soon_threadsafe(_settle, opened)
            return
        self._db = db
        opened = [(connected, None, None)]
        loop.call_soon_threadsafe(_settle, opened)
        try:
            while True:
                item = self._jobs.get()
                if item is _STOP:
                    return
                if item is _CHECKPOINT:
                    loop.call_soon_threadsafe(self._checkpointed, self._checkpoint(db))
                    continue
                fast, batch = cast(tuple[bool, _Batch], item)
                try:
                    if fast:
                        loop.call_soon_threadsafe(self._rows_done, batch, self._insert_batch(db, batch))
                        continue
                    try:
                        results = self._run_batch(db, batch)
                    except Exception as exc:  # never let the thread die: every waiter would hang
                        failure = self._failure(exc)
                        results = [(fut, None, failure) for _job, fut in batch]
                    loop.call_soon_threadsafe(self._done, results)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    log.warning("%s: the event loop closed before %d results came back", self._options.name,
                                len(batch))  # fmt: skip
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection) -> int | None:
        """Copy the WAL into the database file; the frames it held (None: failed, and logged)."""
        try:
            _busy, frames, _copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("%s: checkpoint failed: %s", self._options.what, exc)
            return None
        return int(frames)

    def _insert_batch(self, db: sqlite3.Connection, batch: _Batch) -> Exception | None:
        """The fast path: a batch of rows as one INSERT, its own transaction; its error, if any
        (any error: the thread never dies of one)."""
        params = [value for row, _fut in batch for value in cast(Row, row)]
        try:
            db.execute(self._statement(len(batch)), params)
        except Exception as exc:
            self._health.failed()
            return exc
        self._health.succeeded()
        return None

    def _run_batch(self, db: sqlite3.Connection, batch: _Batch) -> _Results:
        """Run a batch in one transaction; each job's result or error (and the store's health)."""
        steps = self._steps(batch)
        if len(steps) == 1 and not self._options.immediate:  # one statement: its own transaction
            results = self._run_step(db, steps[0])
        else:
            results = self._transaction(db, batch, steps)
        failed = False
        for i, (fut, _value, exc) in enumerate(results):
            if exc is not None:
                error = results[i] = (fut, None, self._failure(exc))
                failed = failed or isinstance(error[2], StorageError)
        if failed:
            self._health.failed()
        else:
            self._health.succeeded()
        return results

    def _failure(self, exc: BaseException) -> BaseException:
        """``exc`` as the waiter sees it: SQLite's errors as a StorageError naming the store."""
        if isinstance(exc, sqlite3.Error):
            error = StorageError(f"{self._options.what}: {exc}")
            error.__cause__ = exc
            return error
        return self._options.translate(exc)

    def _transaction(self, db: sqlite3.Connection, batch: _Batch, steps: list[_Batch]) -> _Results:
        try:
            db.execute("BEGIN IMMEDIATE" if self._options.immediate else "BEGIN")
        except sqlite3.Error as exc:  # (a disk error, a lock held too long): every job learns it
            return [(fut, None, exc) for _job, fut in batch]
        results: _Results = []
        for step in steps:
            results.extend(self._run_step(db, step))
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            results = [(fut, None, exc) for fut, _, _ in results]
            if db.in_transaction:  # (a failed COMMIT may leave it open: the next BEGIN would fail too)
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
        return results

    def _steps(self, batch: _Batch) -> list[_Batch]:
        """The batch as statements, in order: each job alone, consecutive rows together."""
        rows = self._options.rows
        if rows is None:
            return [[item] for item in batch]
        steps: list[_Batch] = []
        for item in batch:
            last = steps[-1] if steps else None
            if (
                isinstance(item[0], tuple)
                and last is not None
                and isinstance(last[0][0], tuple)
                and len(last) < rows.per_insert
            ):
                last.append(item)
            else:
                steps.append([item])
        return steps

    def _run_step(self, db: sqlite3.Connection, step: _Batch) -> _Results:
        """One statement: a job, or one INSERT of consecutive rows (they succeed or fail together)."""
        first = step[0][0]
        if isinstance(first, tuple):
            return self._insert_rows(db, step)
        # A job of several statements is all or nothing: a savepoint (in a batch of one it is
        # the transaction itself).
        try:
            db.execute("SAVEPOINT job")
            try:
                result = first(db)
            except Exception:
                db.execute("ROLLBACK TO job")
                raise
            finally:
                db.execute("RELEASE job")
        except Exception as exc:  # handed to the job's awaiter, never dropped
            return [(step[0][1], None, exc)]
        return [(step[0][1], result, None)]

    def _statement(self, rows: int) -> str:
        """The multi-row INSERT for ``rows`` rows (built once per row count, on the thread)."""
        sql = self._statements.get(rows)
        if sql is None:
            assert self._options.rows is not None
            sql = self._statements[rows] = self._options.rows.statement(rows)
        return sql

    def _insert_rows(self, db: sqlite3.Connection, step: _Batch) -> _Results:
        try:
            params = [value for row, _fut in step for value in cast(Row, row)]
            db.execute(self._statement(len(step)), params)
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
