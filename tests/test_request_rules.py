"""The request rules and wire details a client depends on, each pinned so that breaking it fails a test.

Each test here was written against one specific way the code could silently go wrong (a rule
relaxed, an index off by one, a field dropped from a chunk); the docstring says what a user
would notice.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from fake_llm import FakeLLM, Step

COMPLETION_KEYS = {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
CHUNK_KEYS = {"id", "object", "created", "model", "system_fingerprint", "choices"}
CHOICE_KEYS = {"index", "delta", "logprobs", "finish_reason"}


async def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST a JSON chat request; the status and the parsed JSON answer."""
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


async def post_stream(url: str, body: dict[str, Any]) -> list[str]:
    """POST a streaming chat request; the SSE data payloads, in order (comments dropped)."""
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        raw = (await r.read()).decode()
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


def user(text: object) -> dict[str, object]:
    return {"role": "user", "content": text}


# -- the messages rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "index"),
    [
        ([user("hi"), {"role": "system", "content": "late"}], 1),
        ([user("hi"), {"role": "developer", "content": "late"}], 1),
        ([{"role": "system", "content": "ok"}, user("hi"), {"role": "developer", "content": "late"}], 2),
        (
            [
                {"role": "system", "content": "a"},
                {"role": "developer", "content": "b"},
                user("hi"),
                user("x"),
            ],
            3,
        ),
        ([{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}, user("hi")], 1),
        ([{"role": "developer", "content": "a"}, user("hi"), {"role": "tool", "content": "r"}], 2),
    ],
)
async def test_messages_after_the_user_message_are_refused_by_index(
    gateway: str, fake_llm: FakeLLM, messages: list[dict[str, object]], index: int
) -> None:
    """Instructions after the user message (or any second message) are a 400 naming exactly that
    messages[i], in the message and in param; the model is never called."""
    status, data = await post(gateway, {"messages": messages})
    assert status == 400, data
    err = data["error"]
    assert err["param"] == f"messages[{index}]"
    assert err["message"].startswith(f"messages[{index}] ({messages[index]['role']}) is not accepted")
    assert fake_llm.requests == []


@pytest.mark.parametrize(
    ("messages", "index"),
    [
        ([{"role": "system", "content": "a"}, 5, user("hi")], 1),
        ([user("hi"), {"content": "no role"}], 1),
        ([{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}, {"role": 3}], 2),
    ],
)
async def test_a_message_without_a_role_is_named_by_index(
    gateway: str, messages: list[object], index: int
) -> None:
    """A message that is not an object with a role is a 400 naming its exact index."""
    status, data = await post(gateway, {"messages": messages})
    assert status == 400, data
    assert data["error"]["param"] == f"messages[{index}]"
    assert data["error"]["message"].startswith(f"messages[{index}] must be an object with a 'role'")


async def test_a_bad_content_part_is_named_by_message_and_part_index(gateway: str) -> None:
    """A bad part in the user message names messages[i].content[j], with i the user message's index."""
    body = {
        "messages": [
            {"role": "system", "content": "a"},
            {"role": "developer", "content": "b"},
            user([{"type": "text", "text": "ok"}, {"type": "audio"}]),
        ]
    }
    status, data = await post(gateway, body)
    assert status == 400 and data["error"]["param"] == "messages[2].content[1]", data
    bad_system = {"messages": [{"role": "system", "content": [{"type": "image_url"}]}, user("hi")]}
    status, data = await post(gateway, bad_system)
    assert status == 400 and data["error"]["message"].startswith("messages[0].content[0]"), data


@pytest.mark.parametrize(
    "content",
    ["   ", "\n\t \r\n", [{"type": "text", "text": "  "}, {"type": "text", "text": "\n"}], [], ""],
    ids=["spaces", "whitespace", "blank parts", "no parts", "empty"],
)
async def test_a_blank_user_message_is_refused(gateway: str, fake_llm: FakeLLM, content: object) -> None:
    """A user message with only whitespace is a 400 (the model would get an empty turn)."""
    status, data = await post(gateway, {"messages": [user(content)]})
    assert status == 400, data
    assert data["error"]["param"] == "messages" and "empty" in data["error"]["message"]
    assert fake_llm.requests == []


# -- form requests ------------------------------------------------------------------------------


async def post_form(url: str, form: aiohttp.FormData | dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", data=form) as r:
        return r.status, await r.json()


def multipart(*fields: tuple[str, str | bytes, str | None]) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value, filename in fields:
        if filename is None:
            form.add_field(name, value)
        else:
            form.add_field(
                name, io.BytesIO(value if isinstance(value, bytes) else value.encode()), filename=filename
            )
    return form


@pytest.mark.parametrize("text", ["", "   ", "\n\t"], ids=["empty", "spaces", "whitespace"])
async def test_a_blank_form_message_is_refused(gateway: str, fake_llm: FakeLLM, text: str) -> None:
    """An empty or blank `message` in a multipart or urlencoded form, with no file, is a 400."""
    for form in (multipart(("message", text, None)), {"message": text}):
        status, data = await post_form(gateway, form)
        assert status == 400, data
        assert data["error"]["param"] == "message" and "empty" in data["error"]["message"]
    status, data = await post_form(gateway, multipart(("session_id", "s", None)))
    assert status == 400 and data["error"]["param"] == "message", data
    assert fake_llm.requests == []


async def test_a_file_without_a_message_is_enough(gateway: str, fake_llm: FakeLLM) -> None:
    """A form with only a file (no message text) is a valid request: the file is the question."""
    status, data = await post_form(gateway, multipart(("files", b"just the file", "only.txt")))
    assert status == 200, data
    assert "just the file" in fake_llm.requests[-1]["messages"][-1]["content"]


@pytest.mark.parametrize("alias", ["files", "file", "files[]"])
async def test_every_file_field_alias_is_accepted(gateway: str, fake_llm: FakeLLM, alias: str) -> None:
    """`files`, `file` and `files[]` (what curl, requests and browsers send) all upload a file."""
    status, data = await post_form(
        gateway, multipart(("message", "read it", None), (alias, f"marker-{alias}", "a.txt"))
    )
    assert status == 200, data
    text = fake_llm.requests[-1]["messages"][-1]["content"]
    assert f"marker-{alias}" in text and "[File: a.txt]" in text


async def test_the_form_system_field_reaches_the_model(gateway: str, fake_llm: FakeLLM) -> None:
    """The multipart `system` field is this turn's extra instructions, sent as the system message."""
    status, _ = await post_form(
        gateway, multipart(("message", "hi", None), ("system", "Answer in haiku-7431.", None))
    )
    assert status == 200
    first = fake_llm.requests[-1]["messages"][0]
    assert first["role"] == "system" and "Answer in haiku-7431." in first["content"]
    status, _ = await post_form(gateway, {"message": "hi", "system": "Speak like a pirate-2288."})
    assert status == 200
    assert "pirate-2288" in fake_llm.requests[-1]["messages"][0]["content"]


async def test_an_oversized_file_is_refused_while_it_streams_in(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """A chunked upload (no Content-Length) over api.maxFileBytes gets its 413 as soon as the limit
    is passed: the client is still sending, the rest of the body is never waited for."""
    limit = 64 * 1024
    url = await start_gateway({"api": {"maxFileBytes": limit}})
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'--XX\r\nContent-Disposition: form-data; name="message"\r\n\r\nread\r\n'
        yield b'--XX\r\nContent-Disposition: form-data; name="files"; filename="big.txt"\r\n\r\n'
        for _ in range(32):  # enough past the limit for the server's read-ahead (a few 256 KiB reads)
            yield b"a" * limit
        await never.wait()  # the rest of the file never comes: only an early answer ends this
        yield b"\r\n--XX--\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=XX"}
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(20):
            async with s.post(f"{url}/v1/chat/completions", data=body(), headers=headers) as r:
                assert r.status == 413
                data = await r.json()
    assert data["error"]["code"] == "payload_too_large" and "big.txt" in data["error"]["message"]
    assert fake_llm.requests == []


# -- what the upstream is sent --------------------------------------------------------------------


@pytest.mark.parametrize("limit", [2, 3, 5])
async def test_trimmed_history_starts_at_a_user_message(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM, limit: int
) -> None:
    """When maxHistoryMessages cuts into a tool-call turn, what is sent upstream still starts at a
    user message: never at an orphan tool result or assistant tool call (which a real upstream
    rejects, failing every later turn of the session)."""
    url = await start_gateway({"agents": {"defaults": {"maxHistoryMessages": limit}}})
    session = {"session_id": "trim"}
    assert (await post(url, {"messages": [user("one")], **session}))[0] == 200
    fake_llm.push(Step(tool_calls=[("message", {"content": "working on it"})]), Step(text="two done"))
    assert (await post(url, {"messages": [user("two")], **session}))[0] == 200
    assert (await post(url, {"messages": [user("three")], **session}))[0] == 200
    sent = fake_llm.requests[-1]["messages"]
    assert sent[0]["role"] == "system"
    history = sent[1:-1]
    assert sent[-1] == {"role": "user", "content": "three"}
    # The stored history is: user one, assistant; user two, assistant tool call, tool, assistant.
    expected = {2: [], 3: [], 5: ["user", "assistant", "tool", "assistant"]}[limit]
    assert [m["role"] for m in history] == expected
    if history:
        assert history[0] == {"role": "user", "content": "two"}


# -- the wire format ------------------------------------------------------------------------------


async def test_non_stream_body_has_exactly_the_openai_keys(gateway: str) -> None:
    """A chat.completion carries every key the SDKs read, no more, no fewer."""
    status, data = await post(gateway, {"messages": [user("hi")]})
    assert status == 200
    assert set(data) == COMPLETION_KEYS
    assert data["system_fingerprint"] is None
    (choice,) = data["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"} and choice["logprobs"] is None
    assert set(choice["message"]) == {"role", "content", "refusal"}
    assert set(data["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


async def test_every_stream_chunk_has_exactly_the_openai_keys(gateway: str, fake_llm: FakeLLM) -> None:
    """Every chunk (role, content, finish, usage) carries exactly the keys of OpenAI's chunks."""
    fake_llm.push(Step(chunks=["a", "b"]))
    body = {"messages": [user("hi")], "stream": True, "stream_options": {"include_usage": True}}
    events = await post_stream(gateway, body)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) >= 4  # role, the text (deltas may be coalesced), finish, usage
    for chunk in chunks[:-1]:
        assert set(chunk) == CHUNK_KEYS, chunk
        assert chunk["system_fingerprint"] is None and chunk["object"] == "chat.completion.chunk"
        (choice,) = chunk["choices"]
        assert set(choice) == CHOICE_KEYS and choice["logprobs"] is None, choice
    assert set(chunks[-1]) == CHUNK_KEYS | {"usage"} and chunks[-1]["choices"] == []
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert all(set(d) == {"content"} for d in deltas[1:-1])
    assert "".join(d["content"] for d in deltas[1:-1]) == "ab"


@pytest.mark.parametrize("reason", ["length", "content_filter", "stop"])
async def test_the_upstream_finish_reason_is_passed_on(gateway: str, fake_llm: FakeLLM, reason: str) -> None:
    """A reply cut at max_tokens says finish_reason "length" (streamed and not), so a client knows
    the answer is incomplete."""
    fake_llm.push(Step(chunks=["cut of"], finish_reason=reason))
    events = await post_stream(gateway, {"messages": [user("hi")], "stream": True})
    finishes = [orjson.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes == [None, None, reason]
    fake_llm.push(Step(text="cut of", finish_reason=reason))
    status, data = await post(gateway, {"messages": [user("hi")]})
    assert status == 200 and data["choices"][0]["finish_reason"] == reason


async def test_a_failed_stream_ends_with_its_error_and_no_done(gateway: str, fake_llm: FakeLLM) -> None:
    """When the turn fails mid-stream, the last event is the OpenAI error object and no [DONE]
    follows (a client would otherwise take the cut answer for a complete one)."""
    fake_llm.push(*[Step(status=400, error="upstream says no")] * 12)
    events = await post_stream(gateway, {"messages": [user("hi")], "stream": True})
    assert "[DONE]" not in events
    last = orjson.loads(events[-1])
    assert set(last) == {"error"} and set(last["error"]) == {"message", "type", "param", "code"}
    assert [set(orjson.loads(e)) for e in events[:-1]] == [CHUNK_KEYS]  # only the role chunk before it
