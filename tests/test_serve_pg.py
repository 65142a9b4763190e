"""`nanobot serve` processes sharing one PostgreSQL (``storage.url``): any process sees every turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from served import serve

from fake_llm import FakeLLM


async def chat(http: aiohttp.ClientSession, url: str, session_id: str, text: str) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": text}], "session_id": session_id}
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        answer: dict[str, Any] = await r.json()
        return answer


async def test_a_second_process_sees_the_first_ones_history(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """A conversation started on one server continues on another: the model sees the earlier turn."""
    extra = {"storage": {"url": pg_url}}
    llm = fake_llm.url  # type: ignore[attr-defined]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # (each process its own workspace: the outbox is still per workspace)
    async with (
        serve(tmp_path / "a", llm, {}, extra=extra) as one,
        serve(tmp_path / "b", llm, {}, extra=extra) as two,
        aiohttp.ClientSession() as http,
    ):
        await chat(http, one.url, "trip", "My name is Ada.")
        await chat(http, two.url, "trip", "What is my name?")
        sent = [m["content"] for m in fake_llm.requests[-1]["messages"] if m["role"] != "system"]
        assert sent[0] == "My name is Ada." and sent[-1] == "What is my name?" and len(sent) == 3
        async with http.get(f"{one.url}/v1/sessions/trip") as r:  # the first sees the second's turn
            stored = await r.json()
        assert stored["turns"] == 2 and stored["title"] == "My name is Ada."
        assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == [
            "My name is Ada.",
            "What is my name?",
        ]
        assert "storage: postgresql://127.0.0.1:" in one.log and "pg-Secret" not in one.log + two.log
