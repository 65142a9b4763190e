"""Group commit of session history, observed the way SQLite records it: commit frames in the WAL."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from nanobot.storage.sessions import SessionStore

TURNS = 200


def wal_commits(wal: Path) -> int:
    """How many transactions the write-ahead log holds: frames whose header carries the database
    size after commit (non-zero only on a commit frame), counted in the WAL's current generation
    (matching salts), as in https://www.sqlite.org/fileformat2.html#walformat."""
    data = wal.read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    commits = 0
    for offset in range(32, len(data) - 24 + 1, 24 + page_size):
        size_after_commit = struct.unpack(">I", data[offset + 4 : offset + 8])[0]
        if data[offset + 8 : offset + 16] != salts:
            break
        commits += size_after_commit != 0
    return commits


async def test_concurrent_turns_share_commits(tmp_path: Path) -> None:
    """Turns finishing together are committed together: 200 concurrent turns cost far fewer than
    200 transactions (one fsync-able commit each would cap throughput at the disk's sync rate)."""
    store = await SessionStore.open(tmp_path)
    try:
        before = wal_commits(tmp_path / "sessions.db-wal")
        turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        await asyncio.gather(*(store.append_turn(f"s{i}", turn) for i in range(TURNS)))
        commits = wal_commits(tmp_path / "sessions.db-wal") - before
    finally:
        await store.close()
    assert 1 <= commits <= TURNS // 4, commits
    reopened = await SessionStore.open(tmp_path)
    try:
        assert [await reopened.history(f"s{i}") for i in (0, TURNS - 1)] == [turn, turn]
    finally:
        await reopened.close()


async def test_a_turn_that_cannot_be_stored_leaves_no_trace(tmp_path: Path) -> None:
    """A turn whose text cannot be serialised fails cleanly, and the session's next turn does not see it
    (it used to stay in the memory copy: every later turn of that session then failed)."""
    from nanobot.errors import NanobotError

    store = await SessionStore.open(tmp_path)
    try:
        assert await store.history("s") == []
        with pytest.raises(NanobotError):
            await store.append_turn("s", [{"role": "user", "content": "bad \udce5"}])
        assert await store.history("s") == []
        good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        await store.append_turn("s", good)
        assert await store.history("s") == good
    finally:
        await store.close()


async def test_concurrent_outbox_messages_share_commits(tmp_path: Path) -> None:
    """The outbox goes through the same group-commit writer: 200 messages enqueued at once cost far
    fewer than 200 transactions, and each one is stored."""
    from nanobot.storage.outbox import NewMessage
    from nanobot.storage.sqlite.outbox import OutboxStore

    store = OutboxStore(tmp_path / "outbox.db")
    await store.open()
    try:
        before = wal_commits(tmp_path / "outbox.db-wal")
        message = NewMessage("telegram", "1", "text", "hi", {})
        added = await asyncio.gather(*(store.add([message]) for _ in range(TURNS)))
        commits = wal_commits(tmp_path / "outbox.db-wal") - before
        assert (await store.counts())["pending"] == TURNS
    finally:
        await store.close()
    assert len({entry.id for batch in added for entry in batch}) == TURNS
    assert 1 <= commits <= TURNS // 4, commits


async def test_a_turn_cancelled_while_its_write_is_in_flight_is_stored_whole(tmp_path: Path) -> None:
    """A client that goes away while its turn is being committed does not lose the turn, nor half of
    it: the session's next turn (in this process and after a restart) sees it whole."""
    store = await SessionStore.open(tmp_path)
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        assert await store.history("s") == []
        waiting = asyncio.ensure_future(store.append_turn("s", turn))
        await asyncio.sleep(0)  # (one step: the turn is handed to the writer and waits for its commit)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await store.history("s") == turn
    finally:
        await store.close()
    reopened = await SessionStore.open(tmp_path)
    try:
        assert await reopened.history("s") == turn
    finally:
        await reopened.close()


def wal_frames(wal: Path) -> int:
    """The most frames the write-ahead log ever held: its size (a checkpoint lets SQLite write it
    again from the start, it never shrinks)."""
    data = wal.read_bytes()[:32]
    page_size = struct.unpack(">I", data[8:12])[0]
    return (wal.stat().st_size - 32) // (24 + page_size)


async def test_the_write_ahead_log_is_checkpointed(tmp_path: Path) -> None:
    """Turns committed one by one (a quiet server) keep the WAL about as small as SQLite's own
    checkpoints would (1,000 frames): the writer thread checkpoints, nothing else does."""
    store = await SessionStore.open(tmp_path)
    try:
        for i in range(1_500):  # ~5 frames each: 7,500 frames if nothing checkpointed
            await store.append_turn(f"s{i}", [{"role": "user", "content": f"hi {i}"}])
        frames = wal_frames(tmp_path / "sessions.db-wal")
    finally:
        await store.close()
    assert 0 < frames <= 2_000, frames
    reopened = await SessionStore.open(tmp_path)
    try:
        assert await reopened.history("s1499") == [{"role": "user", "content": "hi 1499"}]
    finally:
        await reopened.close()


async def test_quiet_rows_commit_on_the_loop_and_the_rest_on_the_thread(tmp_path: Path) -> None:
    """With loop_commits, a row that finds the thread idle is committed on the event loop (no
    hand-off); rows that arrive while the thread works go to it, and so does every checkpoint
    (they fsync: never on the loop). Seen by SQLite's statement trace, with the thread that ran it."""
    import sqlite3
    import threading

    from nanobot.health import StorageHealth
    from nanobot.storage.sqlite.writer import RowInsert, SqliteWriter, WriterOptions

    seen: list[tuple[bool, str]] = []

    def connect() -> sqlite3.Connection:
        db = sqlite3.connect(tmp_path / "t.db", isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (a INTEGER NOT NULL, b TEXT NOT NULL)")
        on_loop = threading.main_thread()
        db.set_trace_callback(lambda sql: seen.append((threading.current_thread() is on_loop, sql)))
        return db

    options = WriterOptions("t-writer", "the test file", rows=RowInsert("INSERT INTO t VALUES ", 2, 50),
                            loop_commits=True)  # fmt: skip
    writer = SqliteWriter(connect, options, StorageHealth("t"))
    await writer.open()
    try:
        for i in range(400):  # one at a time: the thread is idle for each
            await writer.submit_row((i, "x" * 2000))
        gate = threading.Event()
        blocked = writer.submit(lambda db: gate.wait(10))  # the thread is busy with a job
        late = [writer.submit_row((1000 + i, "late")) for i in range(3)]
        gate.set()
        assert await blocked
        await asyncio.gather(*late)
        assert await writer.submit(lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
        assert await writer.submit(lambda db: db.execute("SELECT count(*) FROM t").fetchone()[0]) == 403
    finally:
        await writer.close()
    checkpoints = [on_loop for on_loop, sql in seen if "wal_checkpoint" in sql]
    assert checkpoints and not any(checkpoints), checkpoints
    inserts = [(i, on_loop, sql) for i, (on_loop, sql) in enumerate(seen) if sql.startswith("INSERT")]
    assert len(inserts) == 401
    *quiet, (_, late_on_loop, late_sql) = inserts
    assert not late_on_loop and late_sql.count("'late'") == 3  # the three late rows: one statement
    # Each quiet row was committed on the loop, except the one that came during a checkpoint.
    on_thread = [i for i, on_loop, _ in quiet if not on_loop]
    assert all("wal_checkpoint" in seen[i - 1][1] for i in on_thread), [seen[i - 1] for i in on_thread]
    assert len(on_thread) <= len(checkpoints) < 10, (on_thread, checkpoints)
