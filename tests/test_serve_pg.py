"""`nanobot serve` processes sharing one PostgreSQL (``storage.url``): any process sees every turn."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from served import serve

from fake_llm import FakeLLM, Step


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
        async with http.get(f"{one.url}/health/ready") as r:  # open and migrated: ready
            assert r.status == 200, await r.text()
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
        one.terminate()  # a clean stop closes its connections
        assert await one.exit_code() == 0, one.log


async def test_turns_on_one_session_through_two_processes_never_interleave(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """Turns sent to one session through two servers at once run one after another, none lost."""
    extra = {"storage": {"url": pg_url}}
    llm = fake_llm.url  # type: ignore[attr-defined]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        serve(tmp_path / "a", llm, {}, extra=extra) as one,
        serve(tmp_path / "b", llm, {}, extra=extra) as two,
        aiohttp.ClientSession() as http,
    ):
        texts = [f"turn {i}" for i in range(8)]
        await asyncio.gather(*(chat(http, (one, two)[i % 2].url, "busy", t) for i, t in enumerate(texts)))
        # Serialised turns each saw every earlier one: 1, 3, 5, ... messages went upstream.
        seen = sorted(len([m for m in r["messages"] if m["role"] != "system"]) for r in fake_llm.requests)
        assert seen == list(range(1, 2 * len(texts), 2))
        async with http.get(f"{two.url}/v1/sessions/busy") as r:
            stored = await r.json()
        users = [m["content"] for m in stored["messages"] if m["role"] == "user"]
        assert sorted(users) == sorted(texts) and stored["turns"] == len(texts)
        roles = [m["role"] for m in stored["messages"]]
        assert roles == ["user", "assistant"] * len(texts)


def test_an_unreachable_database_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A server whose PostgreSQL cannot be reached says so in one line (no password) and exits 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # (nothing listens there once closed)
    config = {
        "api": {"port": port},
        "agents": {"defaults": {"workspace": str(tmp_path / "ws")}},
        "storage": {"url": f"postgresql://bot:Unused-Secret-9@127.0.0.1:{port}/nanobot", "connectTimeout": 5},
    }
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "nanobot", "serve", "-c", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}/nanobot" in lines[0] and "Unused-Secret" not in proc.stderr


async def test_a_turn_longer_than_the_lease_keeps_its_session(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """A slow turn renews its lease: a turn sent meanwhile to another server waits, then sees it."""
    extra = {"storage": {"url": pg_url, "leaseSeconds": 0.3}}
    llm = fake_llm.url  # type: ignore[attr-defined]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fake_llm.push(Step(text="slow answer", delay=1.5))  # five lease lengths
    async with (
        serve(tmp_path / "a", llm, {}, extra=extra) as one,
        serve(tmp_path / "b", llm, {}, extra=extra) as two,
        aiohttp.ClientSession() as http,
    ):
        slow = asyncio.create_task(chat(http, one.url, "long", "take your time"))
        async with asyncio.timeout(30):
            while not fake_llm.requests:  # noqa: ASYNC110 (another process's progress, with a deadline)
                await asyncio.sleep(0.01)
        quick = await chat(http, two.url, "long", "and now?")
        assert (await slow)["choices"][0]["message"]["content"] == "slow answer"
        assert quick["choices"][0]["message"]["content"] == "echo: and now?"
        sent = [m["content"] for m in fake_llm.requests[-1]["messages"] if m["role"] != "system"]
        assert sent == ["take your time", "slow answer", "and now?"]
