"""Upstream failures, timeouts, cancellation and auth: each a precise OpenAI error, nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import pytest

from conftest import MODEL
from fake_llm import FakeLLM, Step


async def test_upstream_5xx_is_retried_then_answered(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """A 503 then a success: the client sees only the success."""
    fake_llm.push(Step(status=503), Step(text="recovered"))
    resp = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "recovered"
    assert len(fake_llm.requests) == 2


async def test_upstream_429_honours_retry_after(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """A 429 with Retry-After is retried after the hint."""
    fake_llm.push(Step(status=429, retry_after=0.01), Step(text="ok"))
    resp = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "ok"


async def test_persistent_upstream_failure_is_502_with_its_message(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """After the retries, the client gets a 502 (InternalServerError) carrying the upstream's message."""
    fake_llm.push(*[Step(status=500, error="model overloaded")] * 4)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert "model overloaded" in str(info.value.body)
    assert len(fake_llm.requests) == 4  # the first try and three retries


async def test_upstream_4xx_is_not_retried(gateway: str, fake_llm: FakeLLM) -> None:
    """An upstream 400 is a 502 at once, without retries, and tells the client's SDK not to retry."""
    fake_llm.push(Step(status=400, error="unknown parameter: foo"))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(f"{gateway}/v1/chat/completions", json=body) as r:
        assert r.status == 502
        assert r.headers["x-should-retry"] == "false"
        message = (await r.json())["error"]["message"]
    assert "HTTP 400" in message and "unknown parameter: foo" in message
    assert f"{fake_llm.url}/chat/completions" in message  # type: ignore[attr-defined]
    assert len(fake_llm.requests) == 1


async def test_unreachable_upstream_is_502(start_gateway: Callable[..., Awaitable[str]]) -> None:
    """A provider that refuses connections gives a 502, not a hang."""
    url = await start_gateway({"providers": {"fake": {"apiBase": "http://127.0.0.1:9/v1", "maxRetries": 1}}})
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 502
        assert "cannot reach upstream" in (await r.json())["error"]["message"]


async def test_stalled_upstream_is_504(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """An upstream that never answers hits the read timeout: 504."""
    fake_llm.push(Step(stall=True))
    url = await start_gateway({"providers": {"fake": {"readTimeout": 0.2}}})
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 504
        assert (await r.json())["error"]["code"] == "upstream_timeout"


async def test_request_timeout_is_504(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """A turn longer than api.timeout is a 504 and the upstream call is cancelled."""
    fake_llm.push(Step(stall=True))
    url = await start_gateway({"api": {"timeout": 0.2}})
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 504
        assert (await r.json())["error"]["type"] == "timeout_error"
    await asyncio.wait_for(fake_llm.cancelled.wait(), 5)


async def test_failure_mid_stream_is_an_error_event_not_a_stop(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """An upstream that drops mid-stream yields one error event; the SDK raises, no fake stop."""
    fake_llm.push(Step(chunks=["partial", "more", "end"], drop_after=1))
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            assert not chunk.choices or chunk.choices[0].finish_reason is None
            got.append(chunk.choices[0].delta.content or "")
    assert "partial" in got
    assert "upstream" in str(info.value)


async def test_mid_stream_failure_is_not_retried(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """Once a delta reached the client, a failure is not retried (no duplicated text)."""
    fake_llm.push(Step(chunks=["partial", "more"], drop_after=1), Step(text="should not be used"))
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert len(fake_llm.requests) == 1


async def test_failed_turn_leaves_no_history(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """After a failed turn, the session's history is as if it never started."""
    fake_llm.push(Step(status=400, error="bad"))
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "lost"}], extra_body={"session_id": "f"}
        )
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "next"}], extra_body={"session_id": "f"}
    )
    assert [m["content"] for m in fake_llm.requests[-1]["messages"][1:]] == ["next"]


async def test_client_disconnect_cancels_the_turn(gateway: str, fake_llm: FakeLLM) -> None:
    """A client that goes away cancels its upstream call and leaves no history."""
    fake_llm.push(Step(stall=True))
    body = {"messages": [{"role": "user", "content": "gone"}], "session_id": "d"}
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(f"{gateway}/v1/chat/completions", json=body))
        await asyncio.wait_for(fake_llm.received.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.wait_for(fake_llm.cancelled.wait(), 5)
    async with aiohttp.ClientSession() as s:
        body = {"messages": [{"role": "user", "content": "back"}], "session_id": "d"}
        async with s.post(f"{gateway}/v1/chat/completions", json=body) as r:
            assert r.status == 200
    assert [m["content"] for m in fake_llm.requests[-1]["messages"][1:]] == ["back"]


async def test_stream_client_disconnect_cancels_the_turn(gateway: str, fake_llm: FakeLLM) -> None:
    """Closing a stream mid-way cancels the upstream call."""
    gate = asyncio.Event()
    fake_llm.push(Step(chunks=["one", "two"], gate=gate))
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{gateway}/v1/chat/completions", json=body)
        while b'"one"' not in await asyncio.wait_for(r.content.readline(), 5):
            pass
        r.close()
    await asyncio.wait_for(fake_llm.cancelled.wait(), 5)


async def test_api_key_is_required_on_v1_when_set(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """With api.apiKey: no or a wrong key is a 401 AuthenticationError; /health stays open."""
    url = await start_gateway({"api": {"apiKey": "s3cret"}})
    for key in ("wrong", "dummy"):
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                await c.models.list()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/v1/models") as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
        async with s.get(f"{url}/health") as r:
            assert r.status == 200
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0) as c:
        resp = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert resp.choices[0].message.content == "echo: hi"


async def test_upstream_gets_the_provider_key_and_extra_headers(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """The provider's apiKey and extraHeaders reach the upstream; the client's key does not."""
    url = await start_gateway({"providers": {"fake": {"extraHeaders": {"X-Team": "nb"}}}})
    async with aiohttp.ClientSession() as s:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        async with s.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer client"}
        ) as r:
            assert r.status == 200
    assert fake_llm.headers[0]["Authorization"] == "Bearer sk-upstream"
    assert fake_llm.headers[0]["X-Team"] == "nb"
    assert fake_llm.requests[0]["model"] == MODEL
