"""WAL checkpoints of the embedded session database run off the turns' path.

In WAL mode a commit appends to ``sessions.db-wal``; only a checkpoint copies the log into
``sessions.db`` itself (with two fsyncs). SQLite's own checkpoint ran inside the commit that
crossed 1,000 pages, so that turn waited for it. The writer thread now checkpoints when no turn
is waiting: after a quiet moment, or after a number of commits once their turns have their
answers. The database file's size says when a checkpoint happened.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanobot.health import StorageHealth
from nanobot.storage.sqlite.sessions import SqliteBackend
from nanobot.storage.sqlite.writer import SqliteWriter, WriterOptions

DEADLINE = 30.0  # seconds for the writer thread to get somewhere on a loaded machine


def turn(i: int) -> list[dict[str, Any]]:
    question = f"question {i} " + "x" * 8000
    return [{"role": "user", "content": question}, {"role": "assistant", "content": "ok"}]


def size_of(path: Path) -> int:
    return path.stat().st_size


async def grown(path: Path, size: int) -> int:
    """Wait until ``path`` is larger than ``size`` bytes (another thread's work: polled, with a
    deadline); its size."""
    async with asyncio.timeout(DEADLINE):
        while size_of(path) <= size:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return size_of(path)


async def test_a_burst_of_turns_is_checkpointed_once_the_writer_is_quiet(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    backend = SqliteBackend(path)
    await backend.open()
    try:
        before = size_of(path)
        await asyncio.gather(*(backend.append(f"api:s{i % 7}", turn(i)) for i in range(600)))
        # ~1,200 pages committed, more than SQLite's own threshold: none of it was checkpointed
        # inside a commit (the turns had their answers with the file unchanged) ...
        assert size_of(path) == before
        assert size_of(tmp_path / "sessions.db-wal") > 1000 * 4096
        # ... and once the writer is quiet, it is
        await grown(path, before)
        assert len(await backend.load("api:s3", 1000)) == 2 * 86
    finally:
        await backend.close()
    reopened = sqlite3.connect(path)
    try:
        assert reopened.execute("SELECT count(*) FROM turns").fetchone() == (600,)
    finally:
        reopened.close()


async def test_under_steady_writes_a_checkpoint_follows_every_so_many_commits(tmp_path: Path) -> None:
    """With no quiet moment at all, a checkpoint runs after ``checkpoint_every`` commits, after
    the results of the commit that reached it were sent."""
    path = tmp_path / "log.db"

    def connect() -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute("CREATE TABLE IF NOT EXISTS log (line TEXT)")
        return db

    options = WriterOptions(name="test-writer", what="the test log", checkpoint_idle=3600, checkpoint_every=5)
    writer = SqliteWriter(connect, options, StorageHealth("test"))
    await writer.open()
    try:
        size = size_of(path)

        def insert(line: str) -> Callable[[sqlite3.Connection], object]:
            return lambda db: db.execute("INSERT INTO log VALUES (?)", (line,))

        for i in range(4):  # (one commit each)
            await writer.submit(insert(f"{i}" * 5000))
        assert size_of(path) == size  # four commits: no checkpoint yet (nor a quiet one)
        await writer.submit(insert("fifth"))
        size = await grown(path, size)  # the fifth: checkpointed right after
        rows = await writer.submit(lambda db: db.execute("SELECT count(*) FROM log").fetchone())
        assert rows == (5,)
    finally:
        await writer.close()
