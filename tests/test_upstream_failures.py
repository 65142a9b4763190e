"""Upstream failures, timeouts, cancellation and auth: each a precise OpenAI error, nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from nanobot.config import ProviderConfig
from nanobot.providers import OpenAICompatProvider

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


# --------------------------------------------------------------------------- acting on failures

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


async def post_json(url: str, body: dict[str, object]) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST a chat request; the status, headers and JSON body of the answer."""
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        return r.status, dict(r.headers), await r.json()


async def post_stream(url: str, body: dict[str, object]) -> str:
    """POST a streaming chat request; the raw SSE text of the answer."""
    body = {**body, "stream": True}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        return (await r.read()).decode()


def sse_events(raw: str) -> list[str]:
    """The data of each event in an SSE text."""
    return [line[6:] for line in raw.split("\n") if line.startswith("data: ")]


def streamed_text(raw: str) -> str:
    """The content an SSE answer shows, in order."""
    out = []
    for data in sse_events(raw):
        if data != "[DONE]":
            for choice in orjson.loads(data).get("choices") or ():
                out.append(choice["delta"].get("content") or "")
    return "".join(out)


HI = {"messages": [{"role": "user", "content": "hi"}]}


async def test_a_very_long_stream_line_is_relayed(gateway: str, fake_llm: FakeLLM) -> None:
    """A delta over aiohttp's 512 KiB line limit streams as it does without streaming."""
    big = "x" * 700_000
    fake_llm.push(Step(chunks=["a", big, "z"]))
    raw = await post_stream(gateway, HI)
    assert streamed_text(raw) == "a" + big + "z"
    assert sse_events(raw)[-1] == "[DONE]"


async def test_a_stream_line_over_max_response_bytes_fails_cleanly(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """Past providers.*.maxResponseBytes a stream ends with an error event naming the limit."""
    url = await start_gateway({"providers": {"fake": {"maxResponseBytes": 100_000}}})
    fake_llm.push(Step(chunks=["y" * 200_000]), Step(text="z" * 200_000))
    events = sse_events(await post_stream(url, HI))
    error = orjson.loads(events[-1])["error"]
    assert "maxResponseBytes" in error["message"] and error["code"] == "upstream_error"
    status, _, data = await post_json(url, HI)
    assert status == 502 and "maxResponseBytes" in data["error"]["message"]


async def test_an_html_error_page_is_called_one(gateway: str, fake_llm: FakeLLM) -> None:
    """A proxy's HTML 502 page is reported as an HTML page with its title and the URL called."""
    fake_llm.push(*[Step(status=502, body=HTML_PAGE, content_type="text/html")] * 4)
    status, headers, data = await post_json(gateway, HI)
    message = data["error"]["message"]
    assert status == 502
    assert 'an HTML page ("502 Bad Gateway")' in message and "HTTP 502" in message
    assert f"{fake_llm.url}/chat/completions" in message  # type: ignore[attr-defined]
    assert "malformed" not in message and "<center>" not in message
    assert headers["x-should-retry"] == "false"  # the gateway already retried it


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_200_that_is_not_a_completion_says_what_it_was(
    gateway: str, fake_llm: FakeLLM, stream: bool
) -> None:
    """A login page or a text body with status 200 is named as such, in both modes."""
    fake_llm.push(
        Step(body=b"<html><title>Sign in</title></html>", content_type="text/html"),
        Step(body=b"upstream says no", content_type="text/plain"),
    )
    messages = []
    for _ in range(2):
        if stream:
            raw = await post_stream(gateway, HI)
            assert "[DONE]" not in raw
            messages.append(orjson.loads(sse_events(raw)[-1])["error"]["message"])
        else:
            status, _, data = await post_json(gateway, HI)
            assert status == 502
            messages.append(data["error"]["message"])
    assert 'an HTML page ("Sign in")' in messages[0]
    assert "upstream says no" in messages[1]


async def test_url_in_errors_carries_no_secrets(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """User info and query strings of apiBase (which may hold keys) never appear in errors."""
    base = fake_llm.url.replace("http://", "http://user:pw-secret@") + "?key=q-secret"  # type: ignore[attr-defined]
    url = await start_gateway({"providers": {"fake": {"apiBase": base, "apiKey": ""}}})
    fake_llm.push(Step(status=404, error="no such route"))
    status, headers, data = await post_json(url, HI)
    message = data["error"]["message"]
    assert status == 502 and headers["x-should-retry"] == "false"
    assert "HTTP 404" in message and "apiBase" in message
    assert "pw-secret" not in message and "q-secret" not in message


async def test_an_upstream_quoting_the_key_is_redacted(gateway: str, fake_llm: FakeLLM) -> None:
    """A 401 that quotes the provider key says to check the key, without the key."""
    fake_llm.push(Step(status=401, error="Incorrect API key provided: sk-upstream"))
    status, headers, data = await post_json(gateway, HI)
    message = data["error"]["message"]
    assert status == 502 and headers["x-should-retry"] == "false"
    assert "HTTP 401" in message and "apiKey" in message and "sk-upstream" not in message
    assert len(fake_llm.requests) == 1


async def test_a_deterministic_500_is_not_multiplied_by_the_sdk(gateway: str, fake_llm: FakeLLM) -> None:
    """The SDK's own retries stop once the gateway has retried: 4 upstream calls, not 12."""
    fake_llm.push(*[Step(status=500, error="model overloaded")] * 12)
    async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="k", max_retries=2) as c:
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "gave up after 4 tries" in str(info.value.body)
    assert len(fake_llm.requests) == 4


async def test_an_exhausted_rate_limit_invites_a_later_retry(gateway: str, fake_llm: FakeLLM) -> None:
    """An upstream 429 that outlasts the retries tells the client to retry later."""
    fake_llm.push(*[Step(status=429, retry_after=0, error="slow down")] * 4)
    status, headers, data = await post_json(gateway, HI)
    assert status == 502 and "slow down" in data["error"]["message"]
    assert headers["x-should-retry"] == "true" and "Retry-After" in headers
    assert len(fake_llm.requests) == 4


async def test_a_retry_after_beyond_patience_is_not_waited_for(gateway: str, fake_llm: FakeLLM) -> None:
    """Retry-After: 3600 is honoured, not shortened: no retry now, and the client is told the wait."""
    fake_llm.push(Step(status=429, retry_after=3600, error="quota"), Step(text="too early"))
    status, headers, data = await post_json(gateway, HI)
    assert status == 502 and "quota" in data["error"]["message"]
    assert headers["Retry-After"] == "3600" and headers["x-should-retry"] == "false"
    assert len(fake_llm.requests) == 1


async def test_a_failed_stream_names_the_cause_and_sends_no_done(gateway: str, fake_llm: FakeLLM) -> None:
    """Errors before or inside a stream end it with one error event carrying the cause, never [DONE]."""
    fake_llm.push(
        *[Step(status=500, error="model overloaded")] * 4,
        Step(
            sse=[
                b'data: {"choices":[{"index":0,"delta":{"content":"par"}}]}\n\n',
                b'data: {"error":{"message":"worker crashed","type":"server_error"}}\n\n',
                b"data: [DONE]\n\n",
            ]
        ),
    )
    for cause in ("HTTP 500", "worker crashed"):
        raw = await post_stream(gateway, HI)
        events = sse_events(raw)
        error = orjson.loads(events[-1])["error"]
        assert cause in error["message"] and error["type"] == "upstream_error"
        assert "[DONE]" not in events


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_upstream_finish_reason_is_relayed(gateway: str, fake_llm: FakeLLM, stream: bool) -> None:
    """An answer cut at max_tokens says finish_reason length, streamed or not."""
    fake_llm.push(Step(text="cut sh", finish_reason="length"))
    if stream:
        events = sse_events(await post_stream(gateway, HI))
        finishes = [c["choices"][0]["finish_reason"] for c in map(orjson.loads, events[:-1]) if c["choices"]]
        assert finishes[-1] == "length" and events[-1] == "[DONE]"
    else:
        _, _, data = await post_json(gateway, HI)
        assert data["choices"][0]["finish_reason"] == "length"


# --------------------------------------------------------------------------- stream and JSON agree


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_empty_upstream_answer_is_502_in_both_modes(
    gateway: str, fake_llm: FakeLLM, stream: bool
) -> None:
    """A stream of only [DONE], or a completion without choices, is a 502 and nothing is saved."""
    empty = {"id": "x", "object": "chat.completion", "choices": []}
    fake_llm.push(Step(sse=[b"data: [DONE]\n\n"]) if stream else Step(body=orjson.dumps(empty)))
    body = {**HI, "session_id": "empty"}
    if stream:
        message = orjson.loads(sse_events(await post_stream(gateway, body))[-1])["error"]["message"]
    else:
        status, _, data = await post_json(gateway, body)
        assert status == 502
        message = data["error"]["message"]
    assert "empty answer" in message
    await post_json(gateway, {"messages": [{"role": "user", "content": "again"}], "session_id": "empty"})
    assert [m["content"] for m in fake_llm.requests[-1]["messages"][1:]] == ["again"]


async def test_text_before_a_tool_call_is_in_both_modes(gateway: str, fake_llm: FakeLLM) -> None:
    """What the model says before calling a tool is in the JSON reply exactly as the stream shows it."""
    shown = []
    for stream in (False, True):
        fake_llm.push(
            Step(text="Let me check.", tool_calls=[("message", {"content": "note"})]), Step(text="Done.")
        )
        body = {**HI, "session_id": f"pre-{stream}"}
        if stream:
            shown.append(streamed_text(await post_stream(gateway, body)))
        else:
            shown.append((await post_json(gateway, body))[2]["choices"][0]["message"]["content"])
    assert shown[0] == shown[1] == "Let me check.\n\nnote\n\nDone."
    history = fake_llm.requests[-1]["messages"]
    assert history[2]["content"] == "Let me check." and history[2]["tool_calls"]


# --------------------------------------------------------------------------- the backoff's clock


async def test_the_backoff_waits_what_retry_after_says(fake_llm: FakeLLM) -> None:
    """Retry-After decides each wait (0 and 7 s here), not the configured backoff (20 s)."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    config = ProviderConfig(api_base=fake_llm.url, retry_base_seconds=20.0)  # type: ignore[attr-defined]
    provider = OpenAICompatProvider(config, model=MODEL, sleep=sleep)
    await provider.start()
    try:
        fake_llm.push(Step(status=429, retry_after=0), Step(status=503, retry_after=7), Step(text="ok"))
        answer = await provider.chat([{"role": "user", "content": "hi"}])
        fake_llm.push(Step(status=500), Step(text="ok"))
        await provider.chat([{"role": "user", "content": "hi"}])
    finally:
        await provider.close()
    assert answer.content == "ok"
    assert waits[:2] == [0.0, 7.0]
    assert 10.0 <= waits[2] <= 20.0  # without a hint: the backoff, with jitter


async def test_a_stream_event_of_an_odd_shape_is_named(gateway: str, fake_llm: FakeLLM) -> None:
    """A stream event that is JSON but not a chunk ends the stream with an error quoting it, not a bug."""
    odd = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":"first"}]}}]}\n\n'
    fake_llm.push(Step(sse=[odd, b"data: [DONE]\n\n"]))
    error = orjson.loads(sse_events(await post_stream(gateway, HI))[-1])["error"]
    assert "unexpected shape" in error["message"] and '"index":"first"' in error["message"]


async def test_a_stream_of_many_small_lines_is_bounded_too(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """An upstream that streams without end in small deltas is cut at providers.*.maxResponseBytes
    (the whole stream, not only each line): an error event naming the limit, nothing saved."""
    url = await start_gateway({"providers": {"fake": {"maxResponseBytes": 100_000}}})
    fake_llm.push(Step(chunks=["y" * 100] * 3000))
    events = sse_events(await post_stream(url, HI))
    error = orjson.loads(events[-1])["error"]
    assert "stream larger than 100000 bytes" in error["message"], error
