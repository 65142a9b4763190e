"""The OpenAI-compatible API, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import orjson
import pytest

from conftest import MODEL
from fake_llm import FakeLLM, Step


async def test_health_is_ok_and_carries_a_request_id(gateway: str) -> None:
    """GET /health answers {"status": "ok"} with an x-request-id header."""
    async with aiohttp.ClientSession() as s, s.get(f"{gateway}/health") as r:
        assert r.status == 200
        assert await r.json() == {"status": "ok"}
        assert r.headers["x-request-id"]


async def test_client_request_id_is_echoed(gateway: str) -> None:
    """A client's x-request-id comes back unchanged."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gateway}/health", headers={"x-request-id": "abc-1"}) as r,
    ):
        assert r.headers["x-request-id"] == "abc-1"


async def test_models_lists_the_one_model(client: openai.AsyncOpenAI) -> None:
    """/v1/models lists exactly the configured model, owned by nanobot."""
    page = await client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in page.data] == [(MODEL, "model", "nanobot")]
    assert isinstance(page.data[0].created, int)


async def test_non_stream_completion_has_the_full_openai_shape(gateway: str, fake_llm: FakeLLM) -> None:
    """A non-stream reply is a complete chat.completion object."""
    body = {"messages": [{"role": "user", "content": "hi"}], "session_id": "s1"}
    async with aiohttp.ClientSession() as s, s.post(f"{gateway}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        data = await r.json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == MODEL
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hi", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert data["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


async def test_openai_client_non_stream(client: openai.AsyncOpenAI) -> None:
    """The openai SDK parses the reply, with the listed model and a session_id."""
    resp = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], extra_body={"session_id": "my-session"}
    )
    assert resp.choices[0].message.content == "echo: hello"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.total_tokens == 15


async def test_history_is_kept_per_session(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """A second turn on a session sends the first turn upstream; another session starts empty."""
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "one"}], extra_body={"session_id": "a"}
    )
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "two"}], extra_body={"session_id": "a"}
    )
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "three"}], extra_body={"session_id": "b"}
    )
    second, third = fake_llm.requests[1]["messages"], fake_llm.requests[2]["messages"]
    assert [(m["role"], m["content"]) for m in second[1:]] == [
        ("user", "one"),
        ("assistant", "echo: one"),
        ("user", "two"),
    ]
    assert [(m["role"], m["content"]) for m in third[1:]] == [("user", "three")]


async def test_omitted_session_id_shares_the_default_session(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """Requests without session_id share api:default."""
    for text in ("x", "y"):
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    assert [m["content"] for m in fake_llm.requests[1]["messages"][1:]] == ["x", "echo: x", "y"]


async def test_system_messages_are_instructions_for_this_turn_only(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """Leading system/developer messages reach the model this turn and are not stored."""
    await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Speak French."}, {"role": "user", "content": "hi"}],
        extra_body={"session_id": "sys"},
    )
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "again"}], extra_body={"session_id": "sys"}
    )
    first, second = fake_llm.requests[0]["messages"], fake_llm.requests[1]["messages"]
    assert first[0]["role"] == "system" and "Speak French." in first[0]["content"]
    assert "Speak French." not in orjson.dumps(second).decode()


async def test_other_openai_fields_are_accepted(client: openai.AsyncOpenAI) -> None:
    """temperature, max_tokens, user, metadata, n... never cause a 400."""
    resp = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        temperature=0.1,
        max_tokens=5,
        user="u",
        top_p=0.5,
        presence_penalty=0.1,
        seed=3,
        extra_body={"metadata": {"k": "v"}},
    )
    assert resp.choices[0].message.content == "echo: hi"


async def test_stream_via_openai_client(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """Streaming: role chunk first, content deltas, a finish chunk, a usage chunk, one id throughout."""
    fake_llm.push(Step(chunks=["Hel", "lo", " world"]))
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 15
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].object == "chat.completion.chunk"


async def test_stream_wire_format(gateway: str, fake_llm: FakeLLM) -> None:
    """SSE headers, data: frames, no usage chunk unless asked, and data: [DONE] last."""
    fake_llm.push(Step(chunks=["a", "b"]))
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as s, s.post(f"{gateway}/v1/chat/completions", json=body) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        assert r.headers["x-request-id"]
        raw = (await r.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [orjson.loads(e[6:]) for e in events[:-1]]
    assert all(p["choices"] for p in payloads)  # no usage chunk without include_usage
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


async def test_stream_relays_deltas_before_the_upstream_finishes(gateway: str, fake_llm: FakeLLM) -> None:
    """The first delta reaches the client while the upstream is still holding the rest."""
    gate = asyncio.Event()
    fake_llm.push(Step(chunks=["first", "second"], gate=gate))
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as s, s.post(f"{gateway}/v1/chat/completions", json=body) as r:
        seen = ""
        while '"first"' not in seen:
            line = await asyncio.wait_for(r.content.readline(), 5)
            assert line, "stream ended before the first delta"
            seen += line.decode()
        assert not gate.is_set()
        gate.set()
        rest = (await r.read()).decode()
    assert '"second"' in rest and rest.rstrip().endswith("data: [DONE]")


async def test_keep_alive_comments_while_waiting(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """While the agent works with nothing to send, the stream carries `: keep-alive` comments."""
    gate = asyncio.Event()
    fake_llm.push(
        Step(tool_calls=[("message", {"content": "working"})]), Step(chunks=["x", "done"], gate=gate)
    )
    url = await start_gateway({"api": {"keepAliveSeconds": 0.05}})
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        seen = ""
        while ": keep-alive" not in seen:
            line = await asyncio.wait_for(r.content.readline(), 5)
            assert line
            seen += line.decode()
        gate.set()
        seen += (await r.read()).decode()
    assert "data: [DONE]" in seen


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "messages[1]",
            "session_id",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
            "messages[0]",
            "session_id",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
            "messages[1]",
            "session_id",
        ),
        ({"messages": []}, "messages", "non-empty"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages", "no 'user' message"),
        ({"messages": [{"role": "user", "content": "a"}], "model": "gpt-4"}, "model", "/v1/models"),
        ({"messages": [{"role": "user", "content": "a"}], "session_id": "x" * 129}, "session_id", "128"),
        ({"messages": [{"role": "user", "content": "a"}], "session_id": "a\nb"}, "session_id", "control"),
        ({"messages": [{"role": "user", "content": "a"}], "session_id": 5}, "session_id", "string"),
        ({"messages": [{"role": "user", "content": "a"}], "stream": "yes"}, "stream", "boolean"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages", "empty"),
    ],
)
async def test_bad_requests_get_a_400_naming_the_problem(
    client: openai.AsyncOpenAI, body: dict[str, object], param: str, needle: str
) -> None:
    """Each malformed request is a 400 BadRequestError with the right param and message."""
    with pytest.raises(openai.BadRequestError) as info:
        await client.post("/chat/completions", body=body, cast_to=object)
    err = info.value.body
    assert isinstance(err, dict)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert needle in err["message"]


async def test_malformed_json_and_wrong_content_type(gateway: str) -> None:
    """Broken JSON is a 400 and an unsupported Content-Type a 415, both in OpenAI shape."""
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{gateway}/v1/chat/completions", data=b"{nope", headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400
            assert "parse the JSON" in (await r.json())["error"]["message"]
        async with s.post(
            f"{gateway}/v1/chat/completions", data=b"<x/>", headers={"Content-Type": "application/xml"}
        ) as r:
            assert r.status == 415
            assert (await r.json())["error"]["code"] == "unsupported_media_type"


async def test_unknown_route_and_wrong_method_are_openai_errors(gateway: str) -> None:
    """404 and 405 are OpenAI error objects, never HTML."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway}/v1/nothing") as r:
            assert r.status == 404 and r.content_type == "application/json"
            err = (await r.json())["error"]
            assert set(err) == {"message", "type", "param", "code"} and "/v1/nothing" in err["message"]
            assert r.headers["x-request-id"]
        async with s.get(f"{gateway}/v1/chat/completions") as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"


async def test_openai_client_raises_not_found_for_unknown_route(client: openai.AsyncOpenAI) -> None:
    """The SDK turns our 404 into NotFoundError."""
    with pytest.raises(openai.NotFoundError):
        await client.get("/nothing", cast_to=object)


async def test_body_over_the_request_limit_is_413(start_gateway: Callable[..., Awaitable[str]]) -> None:
    """A JSON body over api.maxRequestBytes is a 413 in OpenAI shape."""
    url = await start_gateway({"api": {"maxRequestBytes": 1000}})
    body = {"messages": [{"role": "user", "content": "x" * 2000}]}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "payload_too_large"


async def test_models_retrieve(client: openai.AsyncOpenAI) -> None:
    """models.retrieve finds the served model and raises NotFoundError for any other."""
    found = await client.models.retrieve(MODEL)
    assert (found.id, found.owned_by) == (MODEL, "nanobot")
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("gpt-4")
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"


async def test_temperature_and_max_tokens_pass_through(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """A client's temperature and max_tokens apply to its turn; nonsense values fall back to the config."""
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0.2, max_tokens=33
    )
    assert (fake_llm.requests[-1]["temperature"], fake_llm.requests[-1]["max_tokens"]) == (0.2, 33)
    await client.post(
        "/chat/completions",
        body={"messages": [{"role": "user", "content": "hi"}], "temperature": "hot", "max_tokens": -1},
        cast_to=object,
    )
    assert (fake_llm.requests[-1]["temperature"], fake_llm.requests[-1]["max_tokens"]) == (0.7, 8192)


async def test_reused_request_ids_do_not_cross_replies(gateway: str, fake_llm: FakeLLM) -> None:
    """Two concurrent requests with the same x-request-id each get their own answer."""
    gate = asyncio.Event()
    fake_llm.push(Step(chunks=["slow"], gate=gate, text="slow"))

    async def ask(text: str, session: str) -> str:
        body = {"messages": [{"role": "user", "content": text}], "session_id": session}
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{gateway}/v1/chat/completions", json=body, headers={"x-request-id": "same"}) as r,
        ):
            assert r.headers["x-request-id"] == "same"
            return str((await r.json())["choices"][0]["message"]["content"])

    first = asyncio.create_task(ask("one", "a"))
    await asyncio.wait_for(fake_llm.received.wait(), 5)
    assert await ask("two", "b") == "echo: two"
    gate.set()
    assert await first == "slow"
