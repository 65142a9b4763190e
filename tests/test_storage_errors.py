"""A storage fault during a request is a clean OpenAI-style 503 with ``Retry-After``: the server is
alive and the client may try again; never a 500, never a traceback in the log."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from storage_faults import store_damaged_turn

from fake_llm import FakeLLM, Step

Start = Callable[..., Awaitable[str]]


async def post_chat(url: str, session_id: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = {"messages": [{"role": "user", "content": "hello?"}], "session_id": session_id}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        return r.status, dict(r.headers), await r.json()


def assert_storage_503(status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
    assert status == 503, body
    assert headers.get("Retry-After") == "1", headers
    assert body["error"]["code"] == "storage_error" and body["error"]["type"] == "server_error", body


async def test_a_damaged_turn_mid_request_is_a_503_not_a_traceback(
    start_gateway: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chat turn on a session whose stored history cannot be read (a damaged row in sessions.db)
    answers 503 storage_error with Retry-After, logs no traceback, and other sessions still work
    (it used to be a 500 "internal error while answering" with a traceback in the log)."""
    workspace = tmp_path / "ws"
    await store_damaged_turn(workspace, "api:broken")
    url = await start_gateway()
    caplog.clear()
    assert_storage_503(*await post_chat(url, "broken"))
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/sessions/broken") as r:
        assert_storage_503(r.status, dict(r.headers), await r.json())
    assert (await post_chat(url, "fine"))[0] == 200


async def test_a_postgres_write_fault_mid_turn_is_a_503_and_passes(
    start_gateway: Start, fake_llm: FakeLLM, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """On PostgreSQL, a turn whose write the database refuses (here: a constraint every new turn
    breaks) answers 503 storage_error with Retry-After and the database's reason, no traceback;
    once the database accepts writes again, the same session works and kept no half turn."""
    # (a pool of two: a refused write that kept its connection would leave the next turns none)
    url = await start_gateway({"storage": {"url": pg_url, "poolSize": 2}})
    admin = await asyncpg.connect(pg_url)
    try:
        fake_llm.push(Step(text="first"))
        assert (await post_chat(url, "s"))[0] == 200
        await admin.execute("ALTER TABLE turns ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
        caplog.clear()
        for _ in range(3):
            fake_llm.push(Step(text="lost"))
            status, headers, body = await post_chat(url, "s")
            assert_storage_503(status, headers, body)
        assert "refuse_all" in body["error"]["message"], body
        assert "Failing row" not in body["error"]["message"] + caplog.text  # (it quotes the turn)
        assert not [r for r in caplog.records if r.exc_info], caplog.text
        await admin.execute("ALTER TABLE turns DROP CONSTRAINT refuse_all")
        fake_llm.push(Step(text="back"))
        assert (await post_chat(url, "s"))[0] == 200
        sent = [m["content"] for m in fake_llm.requests[-1]["messages"] if m["role"] != "system"]
        assert sent == ["hello?", "first", "hello?"], sent  # (the refused turns left nothing behind)
    finally:
        await admin.close()
