"""Conversation history per session key, and the per-session turn locks.

History lives in memory (a bounded LRU of recent sessions) backed by an embedded
SQLite file under the workspace. Reads come from memory; a session not in memory is
loaded once (only if it is known to exist on disk). Writes go to one database thread
that commits whatever has queued up in one transaction (group commit), so a turn costs
no thread hop of its own and the event loop never touches the disk. Session keys are
only ever SQL parameters: no path is built from user input.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import orjson

from nanobot import session_table
from nanobot.errors import NanobotError, StorageError
from nanobot.health import StorageHealth
from nanobot.keylock import KeyedLocks
from nanobot.session_table import SessionInfo
from nanobot.workspace import prepare as prepare_workspace

ChatMessage = dict[str, Any]  # one message in OpenAI chat format (JSON-shaped by nature)

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


class SessionBackend(Protocol):
    """Where history is kept; SQLite here, a shared engine when one machine is outgrown."""

    async def keys(self) -> set[str]:
        """Every session key that has history."""
        ...

    async def load(self, key: str, limit: int) -> list[ChatMessage]:
        """At least the last ``limit`` messages of a session (whole turns), oldest first."""
        ...

    def append(self, key: str, messages: Sequence[ChatMessage]) -> Awaitable[object]:
        """Durably add one turn's messages to a session; the awaitable resolves once committed.

        Already under way when returned (a future, not a coroutine), so shielding it costs
        no extra task.
        """
        ...

    async def close(self) -> None:
        """Flush and release the storage."""
        ...

    async def page(self, prefix: str, limit: int, after: str | None) -> tuple[list[SessionInfo], bool] | None:
        """Sessions whose key starts with ``prefix``, newest first, after the key ``after``;
        whether there are more. None when ``after`` is not such a session."""
        ...

    async def read(
        self, key: str, max_messages: int, max_bytes: int
    ) -> tuple[SessionInfo, list[ChatMessage], bool] | None:
        """A session's row and its newest whole turns (bounded); whether older ones were left out."""
        ...

    async def rename(self, key: str, title: str) -> SessionInfo | None:
        """Set an existing session's title; None when there is no such session."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove a session and its history; whether it existed."""
        ...


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


def message_size(message: ChatMessage) -> int:
    """The text a message carries (its content and tool-call arguments), in characters."""
    content = message.get("content")
    size = len(content) if isinstance(content, str) else 0
    for call in message.get("tool_calls") or ():
        size += len(call["function"]["arguments"])
    return size


def trim_history(messages: list[ChatMessage], limit: int, max_chars: int = 0) -> list[ChatMessage]:
    """The last ``limit`` messages (and, with ``max_chars``, no more text than that), starting
    at a user message so no tool result loses its call."""
    start = max(0, len(messages) - limit)
    if max_chars:
        total = 0
        for i in range(len(messages) - 1, start - 1, -1):
            total += message_size(messages[i])
            if total > max_chars:
                start = i + 1
                break
    while start < len(messages) and messages[start].get("role") != "user":
        start += 1
    return messages[start:] if start else messages


# Counted per cached message on top of its text: the dict and its keys cost memory too.
_MESSAGE_OVERHEAD = 64


def _cost(messages: Sequence[ChatMessage]) -> int:
    return sum(message_size(m) for m in messages) + _MESSAGE_OVERHEAD * len(messages)


class SessionStore:
    """History per session key, cached in memory, persisted through a :class:`SessionBackend`.

    The cache is bounded by size (``cache_bytes``, roughly the text it holds) and by count:
    least recently used sessions are dropped first and reloaded from disk when next needed;
    a session larger than the whole bound is never cached.
    """

    def __init__(
        self,
        backend: SessionBackend,
        *,
        max_messages: int = 100,
        max_chars: int = 0,
        cache_size: int = 10_000,
        cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._backend = backend
        self._max = max_messages
        self._max_chars = max_chars
        self._cache_size = cache_size
        self._cache_limit = cache_bytes
        self._cache: OrderedDict[str, list[ChatMessage]] = OrderedDict()
        self._costs: dict[str, int] = {}  # key -> its cached messages' approximate size
        self._cache_bytes = 0
        self._known: set[str] = set()
        self._locks = KeyedLocks()

    def lock(self, key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with store.lock(key):`` holds ``key``'s turn lock: turns on one session never
        interleave (FIFO); nearly free when nobody waits (see :mod:`nanobot.keylock`)."""
        return self._locks(key)

    @classmethod
    async def open(
        cls,
        workspace: Path,
        *,
        max_messages: int = 100,
        max_chars: int = 0,
        cache_bytes: int = 64 * 1024 * 1024,
        health: StorageHealth | None = None,
    ) -> SessionStore:
        """Open (or create) the session database under ``workspace``."""
        backend = SqliteBackend(workspace / "sessions.db", health)
        store = cls(backend, max_messages=max_messages, max_chars=max_chars, cache_bytes=cache_bytes)
        store._known = await backend.keys()
        return store

    @property
    def cache_bytes(self) -> int:
        """Approximate size of the histories held in memory (at most ``cache_bytes``)."""
        return self._cache_bytes

    async def close(self) -> None:
        """Flush pending writes and close the backend."""
        await self._backend.close()

    async def history(self, key: str) -> list[ChatMessage]:
        """The bounded history of ``key`` (a copy the caller may extend)."""
        cached = self._cache.get(key)
        if cached is None:
            if key not in self._known:  # a new session: cached by append_turn, with its first turn
                return []
            cached = trim_history(await self._backend.load(key, self._max), self._max)
            self._remember(key, cached, _cost(cached))
        else:
            self._cache.move_to_end(key)
        return list(trim_history(cached, self._max, self._max_chars))

    async def append_turn(self, key: str, messages: Sequence[ChatMessage]) -> None:
        """Persist one whole turn at once and make it part of the history.

        The memory copy is updated first so the next turn on this session sees it; the
        commit is shielded: a turn that reached this point is complete even if its
        client goes away. If the commit fails, the memory copy is dropped and reloaded.
        """
        try:  # serialised before the memory copy changes: a turn that cannot be stored leaves no trace
            committed = self._backend.append(key, messages)
        except (TypeError, ValueError) as exc:
            raise NanobotError(f"could not save the conversation: {exc}") from exc
        cached = self._cache.get(key)
        if cached is None and key not in self._known:  # a new session: this turn is its history
            cached = list(messages)
            cost = _cost(cached)
        elif cached is not None:  # (if it was evicted meanwhile, the next turn reloads it)
            cached.extend(messages)
            cost = self._costs[key] + _cost(messages)
        if cached is not None:
            if len(cached) > self._max * 2:
                cached = trim_history(cached, self._max)
                cost = _cost(cached)
            self._remember(key, cached, cost)
        self._known.add(key)
        try:
            await asyncio.shield(committed)
        except sqlite3.Error as exc:
            self._forget(key)
            raise NanobotError(f"could not save the conversation: {exc}") from exc

    # -- sessions over HTTP: listing, reading, renaming, deleting (off the turn path)
    async def page(self, prefix: str, limit: int, after: str | None) -> tuple[list[SessionInfo], bool] | None:
        """Sessions whose key starts with ``prefix``, newest first (see :meth:`SessionBackend.page`)."""
        try:
            return await self._backend.page(prefix, limit, after)
        except sqlite3.Error as exc:
            raise StorageError(f"could not list the sessions: {exc}") from exc

    async def read(
        self, key: str, max_messages: int, max_bytes: int
    ) -> tuple[SessionInfo, list[ChatMessage], bool] | None:
        """The whole stored history of ``key`` (not only the model's window), bounded."""
        try:
            return await self._backend.read(key, max_messages, max_bytes)
        except sqlite3.Error as exc:
            raise StorageError(f"could not read the conversation: {exc}") from exc

    async def rename(self, key: str, title: str) -> SessionInfo | None:
        """Set the title of an existing session."""
        try:
            return await self._backend.rename(key, title)
        except sqlite3.Error as exc:
            raise StorageError(f"could not rename the conversation: {exc}") from exc

    async def delete(self, key: str) -> bool:
        """Forget ``key`` on disk and in memory; waits for a running turn (the turn lock), so it
        never interleaves with one, and the next turn starts fresh."""
        async with self.lock(key):
            # Shielded, and the memory copy dropped first: a client that goes away mid-way
            # cannot leave a cached history whose rows are gone (or the reverse).
            deleting = asyncio.ensure_future(self._backend.delete(key))
            self._forget(key)
            self._known.discard(key)
            try:
                return await asyncio.shield(deleting)
            except sqlite3.Error as exc:
                self._known.add(key)  # still on disk: the next turn reloads it
                raise NanobotError(f"could not delete the conversation: {exc}") from exc

    def _remember(self, key: str, messages: list[ChatMessage], cost: int) -> None:
        """Cache ``key`` as most recently used, then drop the least recently used over the bounds."""
        self._forget(key)
        if cost > self._cache_limit:
            return  # bigger than the whole cache: read from disk each time instead
        self._cache[key] = messages
        self._costs[key] = cost
        self._cache_bytes += cost
        while self._cache_bytes > self._cache_limit or len(self._cache) > self._cache_size:
            self._forget(next(iter(self._cache)))

    def _forget(self, key: str) -> None:
        if self._cache.pop(key, None) is not None:
            self._cache_bytes -= self._costs.pop(key)
