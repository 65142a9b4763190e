"""The session storage contract, run on both backends: the embedded SQLite file and PostgreSQL.

Every assertion here holds for both, so a deployment that moves from one process to several
(``storage.url``) keeps the same history, titles, listing order and limits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nanobot.storage.base import SessionBackend
from nanobot.storage.postgres import PgStorage
from nanobot.storage.sqlite.sessions import SqliteBackend
from nanobot.storage_config import StorageConfig


def turn(user: str, answer: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionBackend]:
    """A fresh session backend of each kind."""
    if request.param == "sqlite":
        sqlite = SqliteBackend(tmp_path / "sessions.db")
        await sqlite.open()
        yield sqlite
        await sqlite.close()
        return
    storage = await PgStorage.open(StorageConfig(url=request.getfixturevalue("pg_url")))
    yield storage.sessions
    await storage.close()


async def test_turns_come_back_whole_and_in_order(backend: SessionBackend) -> None:
    """A session's turns are read back oldest first, and only that session's."""
    for i in range(3):
        await backend.append("api:a", turn(f"q{i}", f"a{i}"))
    await backend.append("api:b", turn("other", "x"))
    history = await backend.load("api:a", 100)
    assert [m["content"] for m in history] == ["q0", "a0", "q1", "a1", "q2", "a2"]
    assert await backend.keys() == {"api:a", "api:b"}


async def test_load_limit_keeps_the_newest_turns(backend: SessionBackend) -> None:
    """Loading with a limit gives the newest whole turns, never half of one."""
    for i in range(5):
        await backend.append("api:a", turn(f"q{i}", f"a{i}"))
    history = await backend.load("api:a", 2)
    assert [m["content"] for m in history] == ["q3", "a3", "q4", "a4"]


async def test_odd_text_survives_storage(backend: SessionBackend) -> None:
    """NUL characters, emoji and tool calls come back exactly as they were written."""
    messages = [
        {"role": "user", "content": "nul \x00 inside, emoji 🦊, accents é"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "\x00"},
        {"role": "assistant", "content": "done \x00"},
    ]
    await backend.append("api:odd", messages)
    assert await backend.load("api:odd", 10) == messages
    found = await backend.read("api:odd", 100, 1 << 20)
    assert found is not None
    info, stored, truncated = found
    assert stored == messages and not truncated
    assert info.title.startswith("nul") and info.turns == 1


async def test_session_rows_follow_turns(backend: SessionBackend) -> None:
    """A session's title is its first question, its preview the last answer, its count its turns."""
    await backend.append("api:s", turn("What is the capital of France?", "Paris."))
    await backend.append("api:s", turn("And of Italy?", "Rome."))
    found = await backend.read("api:s", 100, 1 << 20)
    assert found is not None
    info = found[0]
    assert (info.key, info.title, info.preview, info.turns) == (
        "api:s",
        "What is the capital of France?",
        "Rome.",
        2,
    )
    assert info.created <= info.updated


async def test_listing_is_newest_first_by_prefix_and_pages(backend: SessionBackend) -> None:
    """Listing shows only keys with the prefix, newest first, in pages that continue after a key."""
    for key in ["api:one", "api:two", "telegram:1", "api;x", "apiz", "api:three"]:
        await backend.append(key, turn(key, "ok"))
    await backend.append("api:one", turn("again", "ok"))  # now the newest
    first = await backend.page("api:", 2, None)
    assert first is not None
    assert [s.key for s in first[0]] == ["api:one", "api:three"] and first[1] is True
    rest = await backend.page("api:", 2, "api:three")
    assert rest is not None
    assert [s.key for s in rest[0]] == ["api:two"] and rest[1] is False
    assert await backend.page("api:", 2, "api:missing") is None
    assert await backend.page("api:", 2, "telegram:1") is None  # (a cursor outside the prefix)


async def test_read_is_bounded_by_messages_and_bytes(backend: SessionBackend) -> None:
    """Reading a long session gives its newest whole turns within the bounds, and says so."""
    for i in range(10):
        await backend.append("api:long", turn(f"q{i}", "a" * 100))
    found = await backend.read("api:long", 5, 1 << 20)
    assert found is not None
    _, messages, truncated = found
    assert [m["content"] for m in messages][::2] == ["q8", "q9"] and truncated
    by_bytes = await backend.read("api:long", 1000, 1)  # the newest turn always comes back
    assert by_bytes is not None
    assert [m["content"] for m in by_bytes[1]][::2] == ["q9"] and by_bytes[2]
    assert await backend.read("api:none", 10, 1000) is None


async def test_rename_keeps_the_title_across_turns(backend: SessionBackend) -> None:
    """A renamed session keeps its new title when more turns come; an unknown one is None."""
    await backend.append("api:r", turn("first", "ok"))
    renamed = await backend.rename("api:r", "My trip")
    assert renamed is not None and renamed.title == "My trip"
    await backend.append("api:r", turn("second", "ok"))
    found = await backend.read("api:r", 10, 1 << 20)
    assert found is not None and found[0].title == "My trip" and found[0].turns == 2
    assert await backend.rename("api:nobody", "x") is None


async def test_delete_forgets_everything(backend: SessionBackend) -> None:
    """A deleted session is gone from keys, listing and reads; deleting it again says so."""
    await backend.append("api:d", turn("bye", "ok"))
    await backend.append("api:keep", turn("stay", "ok"))
    assert await backend.delete("api:d") is True
    assert await backend.keys() == {"api:keep"}
    assert await backend.read("api:d", 10, 1000) is None
    assert await backend.load("api:d", 10) == []
    listed = await backend.page("api:", 10, None)
    assert listed is not None and [s.key for s in listed[0]] == ["api:keep"]
    assert await backend.delete("api:d") is False


async def test_a_message_that_is_not_json_is_refused_at_once(backend: SessionBackend) -> None:
    """A turn that cannot be serialised raises before anything is written."""
    with pytest.raises(TypeError):
        backend.append("api:bad", [{"role": "user", "content": object()}])
    assert await backend.keys() == set()
