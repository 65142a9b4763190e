"""Damage done to a workspace's stored sessions on purpose, for the storage-fault tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nanobot.storage.sessions import SessionStore

TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


async def store_damaged_turn(workspace: Path, key: str) -> None:
    """Store one turn of session ``key`` in ``workspace``'s sessions.db, then overwrite it with bytes
    that are not JSON (as a damaged disk or a foreign writer would), the server not running."""
    store = await SessionStore.open(workspace)
    await store.append_turn(key, TURN)
    await store.close()
    db = sqlite3.connect(workspace / "sessions.db")
    db.execute("UPDATE turns SET data = ? WHERE session = ?", (b"not json", key))
    db.commit()
    db.close()
