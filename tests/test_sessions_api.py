"""Sessions over HTTP: /v1/sessions lists, reads, renames and deletes the API's sessions."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from storage_faults import store_damaged_turn

from fake_llm import FakeLLM, Step

Json = dict[str, Any]
SESSION_KEYS = {"id", "object", "title", "created", "updated", "turns", "preview"}


async def call(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request; the status and the parsed JSON answer."""
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json()


async def chat(url: str, text: str, session: str | None = None, **extra: Any) -> Json:
    """One chat turn (non-stream); its JSON answer."""
    body: Json = {"messages": [{"role": "user", "content": text}], **extra}
    if session is not None:
        body["session_id"] = session
    status, data = await call("POST", f"{url}/v1/chat/completions", body)
    assert status == 200, data
    return data


async def test_sessions_are_listed_newest_first_with_title_preview_and_turns(gateway: str) -> None:
    """After chatting on three sessions, GET /v1/sessions shows them newest first, each with
    its first message as title, its last answer as preview, and its turn count."""
    await chat(gateway, "first question on alpha", "alpha")
    await chat(gateway, "hello beta", "beta")
    await chat(gateway, "second question on alpha " + "x" * 300, "alpha")
    await chat(gateway, "to the shared session")
    status, page = await call("GET", f"{gateway}/v1/sessions")
    assert status == 200, page
    assert page["object"] == "list" and page["has_more"] is False
    assert [s["id"] for s in page["data"]] == ["default", "alpha", "beta"]
    assert (page["first_id"], page["last_id"]) == ("default", "beta")
    alpha = page["data"][1]
    assert set(alpha) == SESSION_KEYS and alpha["object"] == "session"
    assert alpha["title"] == "first question on alpha"
    assert alpha["turns"] == 2
    assert alpha["preview"].startswith("echo: second question on alpha xxx")
    assert len(alpha["preview"]) <= 120 and alpha["preview"].endswith("…")
    assert isinstance(alpha["created"], int) and alpha["updated"] >= alpha["created"]


async def test_pages_follow_the_after_cursor_without_gaps_or_repeats(gateway: str) -> None:
    """limit and after page through every session exactly once, newest first; has_more says
    when to stop."""
    for i in range(5):
        await chat(gateway, f"message {i}", f"s{i}")
    seen: list[str] = []
    after: str | None = None
    while True:
        query = "?limit=2" + (f"&after={after}" if after else "")
        status, page = await call("GET", f"{gateway}/v1/sessions{query}")
        assert status == 200, page
        assert len(page["data"]) <= 2
        seen += [s["id"] for s in page["data"]]
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert seen == ["s4", "s3", "s2", "s1", "s0"]
    _, first = await call("GET", f"{gateway}/v1/sessions?limit=2&after=")
    assert [s["id"] for s in first["data"]] == ["s4", "s3"] and first["has_more"] is True


BAD_QUERIES = [
    *("limit=0", "limit=101", "limit=abc", "limit=%C2%B2", "limit=" + "9" * 5000),
    *("after=nobody", "after=%01x"),
]


@pytest.mark.parametrize("query", BAD_QUERIES)
async def test_bad_list_parameters_are_400s(gateway: str, query: str) -> None:
    """A limit outside 1-100, or an after that names no session, is a 400 naming the parameter."""
    await chat(gateway, "hi", "one")
    status, data = await call("GET", f"{gateway}/v1/sessions?{query}")
    assert status == 400, data
    assert data["error"]["param"] == query.split("=")[0]


async def test_a_session_reads_back_as_openai_messages_with_tool_calls(
    gateway: str, fake_llm: FakeLLM
) -> None:
    """GET /v1/sessions/{id} returns every stored message in OpenAI chat format, tool calls and
    results included, oldest first."""
    fake_llm.push(Step(tool_calls=[("message", {"content": "working on it"})]), Step(text="done"))
    await chat(gateway, "do the thing", "tools")
    await chat(gateway, "and again", "tools")
    status, data = await call("GET", f"{gateway}/v1/sessions/tools")
    assert status == 200, data
    assert set(data) == SESSION_KEYS | {"messages", "truncated"}
    assert data["truncated"] is False and data["turns"] == 2
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    call_msg = data["messages"][1]
    assert call_msg["tool_calls"][0]["function"]["name"] == "message"
    assert data["messages"][2]["tool_call_id"] == call_msg["tool_calls"][0]["id"]
    assert data["messages"][3]["content"] == "done"
    assert data["messages"][-1] == {"role": "assistant", "content": "echo: and again"}


async def test_rename_sets_the_title_shown_in_the_list(gateway: str) -> None:
    """PATCH {"title"} renames a session: the answer and the list show the new title."""
    await chat(gateway, "what is the capital of France", "geo")
    status, data = await call("PATCH", f"{gateway}/v1/sessions/geo", {"title": "Geography ✈"})
    assert status == 200, data
    assert data["title"] == "Geography ✈" and set(data) == SESSION_KEYS
    await chat(gateway, "and of Spain", "geo")  # a later turn keeps the user's title
    _, page = await call("GET", f"{gateway}/v1/sessions")
    assert page["data"][0]["title"] == "Geography ✈"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": "line\nbreak"}, "title"),
        ({"title": 5}, "title"),
        ({"name": "x"}, "title"),
        ([1], "title"),
    ],
)
async def test_a_bad_title_is_a_400(gateway: str, body: object, param: str) -> None:
    """A title that is empty, blank, over 200 characters, has control characters or is not a
    string is refused with a 400 naming title; the session keeps its title."""
    await chat(gateway, "hello there", "t")
    status, data = await call("PATCH", f"{gateway}/v1/sessions/t", body)
    assert status == 400, data
    assert data["error"]["param"] == param
    _, got = await call("GET", f"{gateway}/v1/sessions/t")
    assert got["title"] == "hello there"


async def test_unknown_sessions_are_404_on_every_method(gateway: str) -> None:
    """GET, PATCH and DELETE on a session that has no turns answer 404 session_not_found."""
    for method, body in (("GET", None), ("PATCH", {"title": "x"}), ("DELETE", None)):
        status, data = await call(method, f"{gateway}/v1/sessions/ghost", body)
        assert status == 404, (method, data)
        assert (
            data["error"]["code"] == "session_not_found" and data["error"]["type"] == "invalid_request_error"
        )


@pytest.mark.parametrize("path", ["bad%01id", "x" * 129])
async def test_bad_session_ids_are_400(gateway: str, path: str) -> None:
    """An id that breaks the session_id rules (control characters, over 128 characters) is a 400."""
    status, data = await call("GET", f"{gateway}/v1/sessions/{path}")
    assert status == 400, data
    assert data["error"]["param"] == "id"


async def test_wrong_methods_are_405(gateway: str) -> None:
    """POST on /v1/sessions or PUT on a session is 405 in OpenAI error shape."""
    for method, path in (("POST", "/v1/sessions"), ("PUT", "/v1/sessions/x"), ("DELETE", "/v1/sessions")):
        status, data = await call(method, f"{gateway}{path}", {})
        assert status == 405, data
        assert "error" in data


async def test_delete_forgets_the_history_on_disk_and_in_memory(gateway: str, fake_llm: FakeLLM) -> None:
    """After DELETE the session is gone from the list and by id, and the next request on that
    id starts fresh: the model sees none of the old conversation."""
    await chat(gateway, "remember the word ostrich", "gone")
    status, data = await call("DELETE", f"{gateway}/v1/sessions/gone")
    assert status == 200, data
    assert data == {"id": "gone", "object": "session.deleted", "deleted": True}
    assert (await call("GET", f"{gateway}/v1/sessions/gone"))[0] == 404
    _, page = await call("GET", f"{gateway}/v1/sessions")
    assert "gone" not in [s["id"] for s in page["data"]]
    await chat(gateway, "which word?", "gone")
    sent = fake_llm.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    _, again = await call("GET", f"{gateway}/v1/sessions/gone")
    assert again["turns"] == 1 and again["title"] == "which word?"


async def test_delete_waits_for_a_running_turn(gateway: str, fake_llm: FakeLLM) -> None:
    """A DELETE sent while a turn runs on that session waits for it, then removes it too: the
    turn's answer still reaches its client, and nothing of the session survives."""
    await chat(gateway, "old turn", "busy")
    gate = asyncio.Event()
    fake_llm.push(Step(chunks=["par", "tial"], gate=gate))
    fake_llm.received.clear()
    body = {"messages": [{"role": "user", "content": "slow"}], "session_id": "busy", "stream": True}

    async def stream() -> str:
        async with aiohttp.ClientSession() as s, s.post(f"{gateway}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            return (await r.read()).decode()

    turn = asyncio.create_task(stream())
    await asyncio.wait_for(fake_llm.received.wait(), 10)  # the turn holds the session now
    deleting = asyncio.create_task(call("DELETE", f"{gateway}/v1/sessions/busy"))
    try:
        done, _ = await asyncio.wait({deleting}, timeout=0.5)
        assert not done, "DELETE returned while the turn was still running"
    finally:
        gate.set()
    assert "data: [DONE]" in await asyncio.wait_for(turn, 10)
    status, data = await asyncio.wait_for(deleting, 10)
    assert status == 200 and data["deleted"] is True
    assert (await call("GET", f"{gateway}/v1/sessions/busy"))[0] == 404


async def test_session_routes_need_the_api_key(start_gateway: Callable[..., Awaitable[str]]) -> None:
    """With api.apiKey set, every session route is 401 without the key and works with it."""
    url = await start_gateway({"api": {"apiKey": "sk-local-key-123"}})
    for method, path in (("GET", "/v1/sessions"), ("GET", "/v1/sessions/x"), ("DELETE", "/v1/sessions/x")):
        status, data = await call(method, f"{url}{path}")
        assert status == 401, data
    ok = {"Authorization": "Bearer sk-local-key-123"}
    status, data = await call("GET", f"{url}/v1/sessions", headers=ok)
    assert status == 200 and data["data"] == []


def _old_database(workspace: Path) -> None:
    """A sessions.db as the previous version wrote it: only the turns table, no schema version."""
    workspace.mkdir(parents=True)
    db = sqlite3.connect(workspace / "sessions.db")
    db.executescript(
        "CREATE TABLE turns (id INTEGER PRIMARY KEY, session TEXT NOT NULL, data BLOB NOT NULL);"
        "CREATE INDEX turns_session ON turns (session, id);"
    )
    rows = [
        (
            "api:old",
            [{"role": "user", "content": "an old question"}, {"role": "assistant", "content": "old answer"}],
        ),
        ("telegram:42", [{"role": "user", "content": "private"}, {"role": "assistant", "content": "secret"}]),
        ("discord:7", [{"role": "user", "content": "also private"}, {"role": "assistant", "content": "x"}]),
        ("api:newer", [{"role": "user", "content": "newer"}, {"role": "assistant", "content": "yes"}]),
        ("api:old", [{"role": "user", "content": "follow-up"}, {"role": "assistant", "content": "latest"}]),
    ]
    db.executemany("INSERT INTO turns (session, data) VALUES (?, ?)", [(k, orjson.dumps(v)) for k, v in rows])
    db.commit()
    db.close()


async def test_an_old_database_is_migrated_and_channel_chats_never_appear(
    start_gateway: Callable[..., Awaitable[str]], tmp_path: Path
) -> None:
    """Sessions stored before this version are listed after an upgrade, in order, with titles and
    turn counts; Telegram and Discord chats in the same database are never listed nor readable."""
    _old_database(tmp_path / "ws")
    url = await start_gateway()
    status, page = await call("GET", f"{url}/v1/sessions")
    assert status == 200, page
    assert [(s["id"], s["title"], s["turns"], s["preview"]) for s in page["data"]] == [
        ("old", "an old question", 2, "latest"),
        ("newer", "newer", 1, "yes"),
    ]
    for sid in ("telegram:42", "discord:7", "42"):
        status, data = await call("GET", f"{url}/v1/sessions/{sid}")
        assert status == 404 and data["error"]["code"] == "session_not_found", (sid, data)
        assert (await call("DELETE", f"{url}/v1/sessions/{sid}"))[0] == 404
    status, data = await call("GET", f"{url}/v1/sessions/old")
    assert [m["content"] for m in data["messages"]] == [
        "an old question",
        "old answer",
        "follow-up",
        "latest",
    ]
    # the server holds sessions.db in exclusive locking mode: read a copy (with its WAL)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("sessions.db", "sessions.db-wal"):
        if (tmp_path / "ws" / name).exists():
            shutil.copy(tmp_path / "ws" / name, copy / name)
    db = sqlite3.connect(copy / "sessions.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
    assert db.execute("SELECT COUNT(*) FROM turns WHERE session = 'telegram:42'").fetchone()[0] == 1
    db.close()


async def test_the_session_header_names_the_session_and_the_body_wins(gateway: str) -> None:
    """X-Session-Id picks the session when the body names none; a body session_id wins over it."""
    hdr = {"X-Session-Id": "from-header"}
    body = {"messages": [{"role": "user", "content": "via header"}]}
    assert (await call("POST", f"{gateway}/v1/chat/completions", body, hdr))[0] == 200
    body = {"messages": [{"role": "user", "content": "via body"}], "session_id": "from-body"}
    assert (await call("POST", f"{gateway}/v1/chat/completions", body, hdr))[0] == 200
    _, page = await call("GET", f"{gateway}/v1/sessions")
    assert {s["id"]: s["title"] for s in page["data"]} == {
        "from-body": "via body",
        "from-header": "via header",
    }
    async with aiohttp.ClientSession() as s:
        form = aiohttp.FormData({"message": "via form"})
        async with s.post(f"{gateway}/v1/chat/completions", data=form, headers=hdr) as r:
            assert r.status == 200
    _, got = await call("GET", f"{gateway}/v1/sessions/from-header")
    assert got["turns"] == 2


async def test_a_bad_session_header_is_a_400(gateway: str, fake_llm: FakeLLM) -> None:
    """An X-Session-Id over 128 characters is a 400 naming the header; no turn runs."""
    body = {"messages": [{"role": "user", "content": "hi"}]}
    status, data = await call("POST", f"{gateway}/v1/chat/completions", body, {"X-Session-Id": "x" * 129})
    assert status == 400 and data["error"]["param"] == "X-Session-Id", data
    assert fake_llm.requests == []


async def test_a_database_from_a_newer_version_is_refused_at_start(tmp_path: Path) -> None:
    """A sessions.db whose schema is newer than this nanobot knows stops start-up with one line
    naming the file and why (exit 2), instead of writing rows that version would misread."""
    workspace = tmp_path / "ws"
    _old_database(workspace)
    db = sqlite3.connect(workspace / "sessions.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    cfg = tmp_path / "c.json"
    cfg.write_bytes(orjson.dumps({"api": {"port": 1}, "agents": {"defaults": {"workspace": str(workspace)}}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanobot", "serve", "-c", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and "sessions.db" in lines[0] and "newer nanobot (schema 99" in lines[0], lines


async def test_a_damaged_turn_is_a_clean_error_and_the_store_keeps_working(
    start_gateway: Callable[..., Awaitable[str]], tmp_path: Path
) -> None:
    """A stored turn that is not JSON any more makes reading that session a 503 storage_error
    (no traceback), and the database thread survives it: every later request is answered."""
    workspace = tmp_path / "ws"
    await store_damaged_turn(workspace, "api:broken")
    url = await start_gateway()
    status, data = await call("GET", f"{url}/v1/sessions/broken")
    assert status == 503 and data["error"]["code"] == "storage_error", data
    status, data = await call("GET", f"{url}/v1/sessions")  # the thread is still there
    assert status == 200 and [s["id"] for s in data["data"]] == ["broken"]
    body = {"messages": [{"role": "user", "content": "still here?"}], "session_id": "fine"}
    assert (await call("POST", f"{url}/v1/chat/completions", body))[0] == 200
