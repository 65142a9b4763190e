"""A session whose history outgrows the model's context keeps working: old turns drop out, or a clear 400."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from fake_llm import FakeLLM, Step, prompt_chars


async def chat(url: str, text: str, session: str = "long", stream: bool = False) -> tuple[int, Any]:
    """One request on ``session``: its status and JSON body (or, streamed, the SSE text)."""
    body = {"messages": [{"role": "user", "content": text}], "session_id": session, "stream": stream}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        return r.status, (await r.text() if stream else await r.json())


def sent(fake_llm: FakeLLM, index: int = -1) -> list[str]:
    """The roles and first words of one upstream request's messages, after the system prompt."""
    return [f"{m['role']}:{(m.get('content') or '')[:3]}" for m in fake_llm.requests[index]["messages"][1:]]


async def test_old_turns_drop_out_when_the_context_is_full(gateway: str, fake_llm: FakeLLM) -> None:
    """Refused for context length, the turn is retried once without the oldest turns and answered."""
    for i in range(4):
        assert (await chat(gateway, f"m{i} " + "x" * 300))[0] == 200
    fake_llm.max_context_chars = 1800  # the next request (about 2,900 characters) no longer fits
    status, data = await chat(gateway, "m4 " + "x" * 300)
    assert status == 200 and data["choices"][0]["message"]["content"].startswith("echo: m4")
    refused, retried = fake_llm.requests[-2], fake_llm.requests[-1]
    assert prompt_chars(refused) > 1800 >= prompt_chars(retried)
    assert retried["messages"][0]["role"] == "system"
    assert sent(fake_llm) == ["user:m2 ", "assistant:ech", "user:m3 ", "assistant:ech", "user:m4 "]


async def test_a_trimmed_history_keeps_tool_calls_with_their_results(gateway: str, fake_llm: FakeLLM) -> None:
    """Dropping turns never leaves a tool result without its call: the history starts at a user message."""
    fake_llm.push(Step(tool_calls=[("message", {"content": "n" * 200})]), Step(text="a" * 200))
    await chat(gateway, "t0 " + "x" * 200)
    fake_llm.push(Step(tool_calls=[("message", {"content": "n" * 200})]), Step(text="a" * 200))
    await chat(gateway, "t1 " + "x" * 200)
    fake_llm.max_context_chars = 1300
    status, _ = await chat(gateway, "t2 " + "x" * 200)
    assert status == 200
    messages = fake_llm.requests[-1]["messages"]
    assert messages[1]["role"] == "user" and messages[1]["content"].startswith("t1")
    calls = {c["id"] for m in messages for c in m.get("tool_calls") or ()}
    assert all(m["tool_call_id"] in calls for m in messages if m["role"] == "tool")


async def test_a_stream_recovers_too(gateway: str, fake_llm: FakeLLM) -> None:
    """A streamed request refused for context length streams the answer of the retry."""
    for i in range(3):
        await chat(gateway, f"s{i} " + "x" * 300)
    fake_llm.max_context_chars = 1200
    status, raw = await chat(gateway, "s3", stream=True)
    assert status == 200 and "echo: s3" in raw and raw.rstrip().endswith("data: [DONE]")


async def test_a_history_that_still_does_not_fit_is_a_clear_400(gateway: str, fake_llm: FakeLLM) -> None:
    """If the retry is refused too: 400 context_length_exceeded saying how to start over, nothing saved."""
    for i in range(2):
        await chat(gateway, f"h{i} " + "x" * 300)
    fake_llm.max_context_chars = 400
    async with aiohttp.ClientSession() as s:
        body = {"messages": [{"role": "user", "content": "h2 " + "x" * 300}], "session_id": "long"}
        async with s.post(f"{gateway}/v1/chat/completions", json=body) as r:
            error = (await r.json())["error"]
            assert r.status == 400 and r.headers["x-should-retry"] == "false"
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert "session_id" in error["message"] and "maximum context length" in error["message"]
    assert len(fake_llm.requests) == 4  # two turns, then the refused request and its one retry
    fake_llm.max_context_chars = None
    await chat(gateway, "after")
    assert sent(fake_llm) == ["user:h0 ", "assistant:ech", "user:h1 ", "assistant:ech", "user:aft"]


async def test_a_message_too_long_on_its_own_says_so(gateway: str, fake_llm: FakeLLM) -> None:
    """With no history to drop, the 400 asks for a shorter message, after one upstream call."""
    fake_llm.max_context_chars = 100
    status, data = await chat(gateway, "y" * 500, session="fresh")
    assert status == 400 and data["error"]["code"] == "context_length_exceeded"
    assert "shorten" in data["error"]["message"]
    assert len(fake_llm.requests) == 1


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens"),
        (400, "the request exceeds the available context size, try increasing it"),
        (400, "prompt is too long: 210000 tokens > 200000 maximum"),
        (413, "Too many tokens in the request"),
        (422, "Input validation error: inputs tokens + max_new_tokens must be <= 4096 (context length)"),
    ],
    ids=["vllm", "llama.cpp", "anthropic", "413", "tgi"],
)
async def test_other_servers_wordings_are_recognised(
    gateway: str, fake_llm: FakeLLM, status: int, message: str
) -> None:
    """vLLM, llama.cpp, Anthropic-style and TGI refusals (no OpenAI code) get the same recovery."""
    await chat(gateway, "w0 " + "x" * 300)
    fake_llm.max_context_chars = 200
    fake_llm.context_status = status
    fake_llm.context_error = {"message": message, "type": "BadRequestError", "code": status}
    status_seen, data = await chat(gateway, "w1")
    assert status_seen == 200 and data["choices"][0]["message"]["content"] == "echo: w1"
    assert sent(fake_llm) == ["user:w1"]


async def test_an_unrelated_400_is_not_a_context_error(gateway: str, fake_llm: FakeLLM) -> None:
    """An upstream 400 about something else stays a 502 and is not retried with less history."""
    await chat(gateway, "u0")
    fake_llm.push(Step(status=400, error="'temperature' must be at most 2"))
    status, data = await chat(gateway, "u1")
    assert status == 502 and "temperature" in data["error"]["message"]
    assert len(fake_llm.requests) == 2
    assert orjson.dumps(data).count(b"context") == 0
