"""The ``sessions`` table: one row per session (title, times, turn count, preview), kept in step
with ``turns`` by the same group-commit job, and the versioned schema migrations.

Every function here takes the database connection and runs on the sessions database thread
(see :mod:`nanobot.storage.sqlite.sessions`); none commits on its own: the writer's batch does.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import orjson

from nanobot.storage.base import NewestTurns, SessionInfo

SCHEMA_VERSION = 1
TITLE_CHARS = 60
PREVIEW_CHARS = 120

_TABLE = (
    """CREATE TABLE IF NOT EXISTS sessions (
        key TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        turns INTEGER NOT NULL,
        preview TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_recent ON sessions (updated, key)",
)
# A turn: the session row is created with its first turn (its first user text as the title
# until the user sets one) or moved forward; the title is left alone after that.
#
# A turn is written as one INSERT into the ``turn_log`` view, whose trigger adds the ``turns``
# row and moves the session's row forward: one statement (so a batch of one turn needs no
# BEGIN/COMMIT), atomic, and no Python round trip per statement on the writer thread.
TURN_LOG = """
CREATE VIEW IF NOT EXISTS turn_log (session, data, title, at, preview) AS
    SELECT session, data, NULL, NULL, NULL FROM turns WHERE 0;
CREATE TRIGGER IF NOT EXISTS turn_log_insert INSTEAD OF INSERT ON turn_log BEGIN
    INSERT INTO turns (session, data) VALUES (NEW.session, NEW.data);
    INSERT INTO sessions (key, title, created, updated, turns, preview)
        VALUES (NEW.session, NEW.title, NEW.at, NEW.at, 1, NEW.preview)
    ON CONFLICT (key) DO UPDATE SET updated = excluded.updated, turns = turns + 1,
        preview = excluded.preview;
END;
"""
INSERT_TURNS = "INSERT INTO turn_log (session, data, title, at, preview) VALUES "
_COLUMNS = "key, title, created, updated, turns, preview"


def _cut(text: str, limit: int) -> str:
    # Only a bounded head is normalised: a turn's text may be a whole extracted document.
    flat = " ".join(text[: limit * 4].split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def summarize(messages: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """A turn's default title (its first user text) and preview (its last assistant text, else
    its user text), each cut short."""
    title = next((_text(m) for m in messages if m.get("role") == "user"), "")
    preview = ""
    for m in reversed(messages):
        if m.get("role") in ("assistant", "user") and _text(m).strip():
            preview = _text(m)
            break
    return _cut(title, TITLE_CHARS), _cut(preview, PREVIEW_CHARS)


def migrate(db: sqlite3.Connection) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION` (in one transaction); refuse a newer one."""
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"it was written by a newer nanobot (schema {version}; this one knows {SCHEMA_VERSION})"
        )
    if version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")  # (not executescript: it would commit half-way)
    try:
        for statement in _TABLE:
            db.execute(statement)
        _backfill(db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _backfill(db: sqlite3.Connection) -> None:
    """Rows for the sessions an older version stored. It kept no times: they get the migration's
    time, stepped back by one microsecond per later turn so newest-first order still holds."""
    top = db.execute("SELECT COALESCE(MAX(id), 0) FROM turns").fetchone()[0]
    now = time.time()
    groups = db.execute("SELECT session, COUNT(*), MIN(id), MAX(id) FROM turns GROUP BY session").fetchall()
    for key, count, first, last in groups:
        title, _ = summarize(_turn(db, first))
        _, preview = summarize(_turn(db, last))
        created, updated = now - (top - first) * 1e-6, now - (top - last) * 1e-6
        db.execute(
            f"INSERT OR IGNORE INTO sessions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (key, title, created, updated, count, preview),
        )


def _turn(db: sqlite3.Connection, turn_id: int) -> list[dict[str, Any]]:
    data = db.execute("SELECT data FROM turns WHERE id = ?", (turn_id,)).fetchone()[0]
    try:
        loaded = orjson.loads(data)
    except orjson.JSONDecodeError:  # (a damaged row: its session still gets a row, untitled)
        return []
    return loaded if isinstance(loaded, list) else []


def info(db: sqlite3.Connection, key: str) -> SessionInfo | None:
    """The row of ``key``, if it has one."""
    row = db.execute(f"SELECT {_COLUMNS} FROM sessions WHERE key = ?", (key,)).fetchone()
    return None if row is None else SessionInfo(*row)


def page(
    db: sqlite3.Connection, prefix: str, limit: int, after: str | None
) -> tuple[list[SessionInfo], bool] | None:
    """Up to ``limit`` sessions whose key starts with ``prefix``, newest first, after the session
    ``after`` (a key); whether there are more. None when ``after`` names no such session."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # keys in [prefix, end) start with prefix
    sql = f"SELECT {_COLUMNS} FROM sessions WHERE key >= ? AND key < ?"
    args: list[object] = [prefix, end]
    if after is not None:
        cursor = info(db, after)
        if cursor is None or not after.startswith(prefix):
            return None
        sql += " AND (updated, key) < (?, ?)"
        args += [cursor.updated, cursor.key]
    sql += " ORDER BY updated DESC, key DESC LIMIT ?"
    rows = db.execute(sql, (*args, limit + 1)).fetchall()
    return [SessionInfo(*r) for r in rows[:limit]], len(rows) > limit


def history(
    db: sqlite3.Connection, key: str, max_messages: int, max_bytes: int
) -> tuple[SessionInfo, list[dict[str, Any]], bool] | None:
    """The session's row and its newest whole turns (at most ``max_messages`` messages and
    about ``max_bytes`` of stored JSON, the newest turn always), oldest first; whether older
    turns were left out. None for an unknown session."""
    found = info(db, key)
    if found is None:
        return None
    newest = NewestTurns(max_messages, max_bytes)
    for (data,) in db.execute("SELECT data FROM turns WHERE session = ? ORDER BY id DESC", (key,)):
        if not newest.take(data):
            break
    return found, newest.messages(), newest.truncated


def rename(db: sqlite3.Connection, key: str, title: str) -> SessionInfo | None:
    """Set the title of an existing session; None when it does not exist."""
    db.execute("UPDATE sessions SET title = ? WHERE key = ?", (title, key))
    return info(db, key)


def delete(db: sqlite3.Connection, key: str) -> bool:
    """Remove a session and its whole history; whether it existed."""
    removed = db.execute("DELETE FROM sessions WHERE key = ?", (key,)).rowcount
    turns = db.execute("DELETE FROM turns WHERE session = ?", (key,)).rowcount
    return bool(removed or turns)
