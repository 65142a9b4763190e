"""The agent's turn: tools, the message tool, iteration limits, session locks and persistence."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import openai
from aiohttp.test_utils import TestServer

from nanobot.config import Config
from nanobot.runtime import build_app

from conftest import MODEL
from fake_llm import FakeLLM, Step


async def ask(client: openai.AsyncOpenAI, text: str, session: str = "t") -> str:
    resp = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], extra_body={"session_id": session}
    )
    return resp.choices[0].message.content or ""


async def test_message_tool_in_api_session_becomes_part_of_the_reply(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """`message` without a channel in an API session adds its text to the HTTP reply."""
    fake_llm.push(Step(tool_calls=[("message", {"content": "Progress: 50%"})]), Step(text="All done."))
    assert await ask(client, "go") == "Progress: 50%\n\nAll done."
    tool_result = fake_llm.requests[1]["messages"][-1]
    assert tool_result["role"] == "tool" and tool_result["content"] == "sent"


async def test_message_tool_text_streams_too(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """In a stream, the message tool's text arrives as content deltas before the answer."""
    fake_llm.push(Step(tool_calls=[("message", {"content": "note"})]), Step(chunks=["fin", "al"]))
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "note\n\nfinal"


async def test_message_tool_to_a_disabled_channel_is_queued_not_sent(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """An explicit channel that is not enabled: the model is told it was queued, the reply is unaffected."""
    fake_llm.push(
        Step(tool_calls=[("message", {"content": "Build finished", "channel": "slack", "chat_id": "1"})]),
        Step(text="Notified."),
    )
    assert await ask(client, "notify") == "Notified."
    result = fake_llm.requests[1]["messages"][-1]["content"]
    assert result.startswith("queued") and "slack is not enabled" in result


async def test_bad_tool_calls_become_error_results(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """Unknown tools and missing arguments are reported to the model, not to the client as failures."""
    fake_llm.push(Step(tool_calls=[("nope", {}), ("message", {})]), Step(text="ok"))
    assert await ask(client, "x") == "ok"
    results = [m["content"] for m in fake_llm.requests[1]["messages"] if m["role"] == "tool"]
    assert results[0] == "Error: unknown tool 'nope'"
    assert "missing required argument" in results[1] and "content" in results[1]


async def test_tools_are_offered_to_the_model(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """The upstream request carries the message tool's definition (first, before the other built-ins)."""
    await ask(client, "hi")
    names = [t["function"]["name"] for t in fake_llm.requests[0]["tools"]]
    assert names[0] == "message"


async def test_tool_turn_is_persisted_whole(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """The next turn's history holds the user message, the tool call, its result and the answer."""
    fake_llm.push(Step(tool_calls=[("message", {"content": "hey"})]), Step(text="answer"))
    await ask(client, "first", "p")
    await ask(client, "second", "p")
    roles = [m["role"] for m in fake_llm.requests[-1]["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user"]
    call = fake_llm.requests[-1]["messages"][2]
    assert call["tool_calls"][0]["function"]["name"] == "message"


async def test_max_tool_iterations_stops_the_loop(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """A model that never stops calling tools is cut off at maxToolIterations with finish_reason length."""
    fake_llm.push(*[Step(tool_calls=[("message", {"content": "again"})])] * 5)
    url = await start_gateway({"agents": {"defaults": {"maxToolIterations": 3}}})
    body = {"messages": [{"role": "user", "content": "loop"}]}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        data = await r.json()
    assert r.status == 200 and data["choices"][0]["finish_reason"] == "length"
    assert "3 tool iterations" in data["choices"][0]["message"]["content"]
    assert len(fake_llm.requests) == 3


async def test_usage_is_summed_over_the_turn(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """Two LLM calls in one turn: usage is their sum."""
    fake_llm.push(
        Step(tool_calls=[("message", {"content": "x"})], usage=(7, 3)), Step(text="y", usage=(20, 4))
    )
    resp = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}])
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (27, 7, 34)


async def test_one_session_never_interleaves(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """A second request on a busy session waits, then sees the first turn in its history."""
    gate = asyncio.Event()
    fake_llm.push(Step(chunks=["A"], gate=gate, text="A"))
    first = asyncio.create_task(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "one"}],
            stream=True,
            extra_body={"session_id": "same"},
        )
    )
    await asyncio.wait_for(fake_llm.received.wait(), 5)
    second = asyncio.create_task(ask(client, "two", "same"))
    other = await ask(client, "three", "elsewhere")  # another session is not blocked
    assert other == "echo: three"
    assert len(fake_llm.requests) == 2  # "two" has not reached the upstream yet
    gate.set()
    stream = await first
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "A"
    assert await second == "echo: two"
    assert [m["content"] for m in fake_llm.requests[-1]["messages"][1:]] == ["one", "A", "two"]


async def test_history_survives_a_restart(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_config: Callable[..., Config],
    fake_llm: FakeLLM,
) -> None:
    """Sessions persist under the workspace: a new process sees the old history."""
    body = {"messages": [{"role": "user", "content": "remember"}], "session_id": "durable"}
    server = await aiohttp_server(build_app(make_config()))
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/chat/completions"), json=body) as r:
        assert r.status == 200
    await server.close()
    server = await aiohttp_server(build_app(make_config()))
    body["messages"] = [{"role": "user", "content": "again"}]
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/chat/completions"), json=body) as r:
        assert r.status == 200
    assert [m["content"] for m in fake_llm.requests[-1]["messages"][1:]] == [
        "remember",
        "echo: remember",
        "again",
    ]


async def test_hostile_session_ids_are_just_keys(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM, make_config: Callable[..., Config]
) -> None:
    """Session ids like ../../etc/passwd never become paths: only database files exist."""
    for sid in ("../../etc/passwd", "/abs/path", "..", "a/b\\c", "ünïcode 🎉"):
        assert await ask(client, "hi", sid) == "echo: hi"
        assert await ask(client, "again", sid) == "echo: again"
        assert [m["content"] for m in fake_llm.requests[-1]["messages"][1:]] == ["hi", "echo: hi", "again"]
    workspace = make_config().agents.defaults.workspace_path
    assert all(p.is_file() and (".db" in p.name or p.name == "nanobot.lock") for p in workspace.iterdir())
    assert [p.name for p in workspace.parent.iterdir()] == ["ws"]


async def test_history_is_bounded(start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM) -> None:
    """Only the last maxHistoryMessages go upstream, starting at a user message."""
    url = await start_gateway({"agents": {"defaults": {"maxHistoryMessages": 4}}})
    async with aiohttp.ClientSession() as s:
        for i in range(6):
            body = {"messages": [{"role": "user", "content": f"m{i}"}], "session_id": "long"}
            async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                assert r.status == 200
    sent = fake_llm.requests[-1]["messages"][1:]
    assert [m["content"] for m in sent] == ["m3", "echo: m3", "m4", "echo: m4", "m5"]


async def test_message_tool_to_another_api_session_fails_clearly(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """The api channel only answers the current request: sending to another api chat reports failure."""
    fake_llm.push(
        Step(tool_calls=[("message", {"content": "hi", "channel": "api", "chat_id": "someone-else"})]),
        Step(text="done"),
    )
    assert await ask(client, "go", "me") == "done"
    result = fake_llm.requests[1]["messages"][-1]["content"]
    assert result.startswith("failed") and "api:someone-else" in result


async def test_history_is_bounded_by_size_too(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """Old turns drop out once the history's text passes maxHistoryChars (big documents don't pile up)."""
    url = await start_gateway({"agents": {"defaults": {"maxHistoryChars": 2500}}})
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            body = {"messages": [{"role": "user", "content": f"doc{i} " + "x" * 1000}], "session_id": "big"}
            async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                assert r.status == 200
    sent = [m["content"][:4] for m in fake_llm.requests[-1]["messages"][1:]]
    assert sent == ["doc1", "echo", "doc2"]
