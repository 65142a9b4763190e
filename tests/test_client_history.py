"""api.clientHistory: clients that resend the whole conversation (chat UIs, `llm -c`, LangChain).

With "accept" such a request runs on the conversation it carries and stores nothing; with the
default "reject" it is the documented 400, whose text says which setting changes that.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MODEL
from fake_llm import FakeLLM, Step
from samples import make_pdf, make_png

Json = dict[str, Any]
FIXTURES = Path(__file__).parent / "fixtures" / "client_history"
ACCEPT = {"api": {"clientHistory": "accept"}}


def fixture(name: str) -> list[Json]:
    """The request bodies of a captured client fixture, images filled in."""
    png = "data:image/png;base64," + base64.b64encode(make_png()).decode()
    raw = (FIXTURES / name).read_text().replace("__PNG_DATA_URL__", png)
    return [r["body"] for r in orjson.loads(raw)["requests"]]


async def post(url: str, body: Json, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST a chat request; the status and the JSON answer, or the raw SSE text for a stream."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        if r.content_type == "text/event-stream":
            return r.status, (await r.read()).decode()
        return r.status, await r.json()


async def sessions(url: str) -> list[str]:
    """The ids GET /v1/sessions lists."""
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/sessions") as r:
        return [x["id"] for x in (await r.json())["data"]]


def upstream_roles(body: Json) -> list[tuple[str, str]]:
    """(role, text) of each message the upstream was sent, images as [image]."""
    out = []
    for m in body["messages"]:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(p["text"] if p["type"] == "text" else "[image]" for p in content)
        out.append((m["role"], content or ""))
    return out


@pytest.fixture
async def accepting(start_gateway: Callable[..., Awaitable[str]]) -> str:
    """A gateway with api.clientHistory "accept"."""
    return await start_gateway(ACCEPT)


# -- the default: "reject" --------------------------------------------------------------------


async def test_reject_names_the_setting_that_accepts_a_conversation(gateway: str, fake_llm: FakeLLM) -> None:
    """By default a resent conversation is a 400 that tells the user about api.clientHistory."""
    status, data = await post(gateway, fixture("llm_cli.json")[1])
    assert status == 400, data
    assert data["error"]["param"] == "messages[2]"
    assert 'api.clientHistory to "accept"' in data["error"]["message"]
    assert fake_llm.requests == []


async def test_a_bad_client_history_value_stops_start_up(tmp_path: Path) -> None:
    """api.clientHistory takes "reject" or "accept"; anything else is one config error line, exit 2."""
    cfg = tmp_path / "c.json"
    cfg.write_text(orjson.dumps({"api": {"clientHistory": "yes"}}).decode())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanobot", "serve", "-c", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert 'api.clientHistory: expected "reject" or "accept"' in err.decode()


# -- "accept": real client shapes --------------------------------------------------------------


async def test_llm_cli_continue_request_runs_on_its_conversation(accepting: str, fake_llm: FakeLLM) -> None:
    """`llm -c`'s captured request: the model gets the whole conversation after our system prompt
    (the client's system text added to it), the stream answers, and no session is stored."""
    first, second = fixture("llm_cli.json")
    for body in (first, second):
        status, raw = await post(accepting, body)
        assert status == 200 and raw.rstrip().endswith("data: [DONE]"), raw
    sent = upstream_roles(fake_llm.requests[-1])
    assert sent[1:] == [
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Spain?"),
    ]
    assert sent[0][0] == "system" and sent[0][1].endswith("Answer in one word.")
    assert '"usage"' in raw  # stream_options.include_usage is honoured
    assert await sessions(accepting) == []


async def test_langchain_history_with_a_tool_call_runs_as_sent(accepting: str, fake_llm: FakeLLM) -> None:
    """LangChain's captured requests, an AIMessage with tool_calls and its ToolMessage included,
    reach the model in order with the call and its result paired; nothing is stored."""
    bodies = fixture("langchain.json")
    for body in bodies:
        status, data = await post(accepting, body)
        assert status == 200, data
    last = fake_llm.requests[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "user"]
    assert last[2]["content"] is None
    assert last[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert last[3] == {"role": "tool", "tool_call_id": "call_abc", "content": "18C, sunny"}
    assert upstream_roles(fake_llm.requests[1])[1:] == [
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Spain?"),
    ]
    assert await sessions(accepting) == []


async def test_open_webui_requests_keep_images_and_store_nothing(accepting: str, fake_llm: FakeLLM) -> None:
    """Open WebUI's request shapes: an image in an earlier message still reaches the model for
    vision, extra fields (cache_control, seed, top_p) are ignored, the title task is answered
    without touching the shared session, and nothing is stored."""
    chat, title_task = fixture("open_webui.json")
    status, raw = await post(accepting, chat)
    assert status == 200 and "data: [DONE]" in raw, raw
    sent = fake_llm.requests[-1]
    assert upstream_roles(sent)[1:] == [
        ("user", "What is in this picture? [image]"),
        ("assistant", "A small red square."),
        ("user", "Make it blue: what colour would it be then?"),
    ]
    image = sent["messages"][1]["content"][1]["image_url"]["url"]
    assert image.startswith("data:image/png;base64,")
    assert sent["temperature"] == 0.8 and sent["max_tokens"] == 512
    status, data = await post(accepting, title_task)
    assert status == 200, data
    assert [m["role"] for m in fake_llm.requests[-1]["messages"]] == ["system", "user"]
    assert await sessions(accepting) == []


async def test_llm_cli_continues_a_conversation_for_real(
    accepting: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """The `llm` CLI itself, pointed at the gateway as an OpenAI-compatible model: a prompt, then
    `llm -c`, and the second upstream call holds the first exchange."""
    home = tmp_path / "llm-home"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f'- model_id: nanobot\n  model_name: {MODEL}\n  api_base: "{accepting}/v1"\n'
    )
    env = {**os.environ, "LLM_USER_PATH": str(home)}
    llm = str(Path(sys.executable).parent / "llm")

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            llm, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return out.decode().strip()

    assert await run("-m", "nanobot", "first question") == "echo: first question"
    assert await run("-c", "second question") == "echo: second question"
    assert upstream_roles(fake_llm.requests[-1])[1:] == [
        ("user", "first question"),
        ("assistant", "echo: first question"),
        ("user", "second question"),
    ]
    assert await sessions(accepting) == []


async def test_langchain_chat_model_keeps_a_conversation_for_real(accepting: str, fake_llm: FakeLLM) -> None:
    """LangChain's ChatOpenAI, pointed at the gateway, with a growing message history: each reply
    answers the latest message with the earlier ones as context."""
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    async with httpx.AsyncClient() as http:  # ours, so it is closed when the test ends
        model = ChatOpenAI(
            base_url=f"{accepting}/v1", api_key="dummy", model=MODEL, max_retries=0, http_async_client=http
        )
        history: list[BaseMessage] = [SystemMessage("Be brief."), HumanMessage("one")]
        reply = await model.ainvoke(history)
        assert reply.content == "echo: one"
        history += [AIMessage(str(reply.content)), HumanMessage("two")]
        chunks = [c.content async for c in model.astream(history)]
    assert "".join(str(c) for c in chunks) == "echo: two"
    assert upstream_roles(fake_llm.requests[-1])[1:] == [
        ("user", "one"),
        ("assistant", "echo: one"),
        ("user", "two"),
    ]
    assert await sessions(accepting) == []


async def test_openai_sdk_resending_history(accepting: str, fake_llm: FakeLLM) -> None:
    """The openai SDK, resending the conversation it builds from the replies, works turn after turn."""
    async with openai.AsyncOpenAI(base_url=f"{accepting}/v1", api_key="x", max_retries=0) as client:
        messages: list[Any] = [{"role": "developer", "content": "Stay on topic."}]
        for text in ("alpha", "beta", "gamma"):
            messages.append({"role": "user", "content": text})
            resp = await client.chat.completions.create(model=MODEL, messages=messages)
            answer = resp.choices[0].message.content
            assert answer == f"echo: {text}"
            messages.append({"role": "assistant", "content": answer})
    assert len(fake_llm.requests[-1]["messages"]) == 6  # system + 5 of the conversation
    assert fake_llm.requests[-1]["messages"][0]["content"].endswith("Stay on topic.")
    assert await sessions(accepting) == []


# -- "accept": what stays the same ------------------------------------------------------------


async def test_one_message_with_a_session_still_uses_the_session(accepting: str, fake_llm: FakeLLM) -> None:
    """With "accept", a request naming a session (body or X-Session-Id) and holding one user
    message keeps using the server's history for that session, exactly as before."""
    for text in ("first", "second"):
        status, _ = await post(
            accepting, {"messages": [{"role": "user", "content": text}]}, {"X-Session-Id": "kept"}
        )
        assert status == 200
    assert upstream_roles(fake_llm.requests[-1])[1:] == [
        ("user", "first"),
        ("assistant", "echo: first"),
        ("user", "second"),
    ]
    assert await sessions(accepting) == ["kept"]


async def test_a_request_naming_no_session_does_not_see_the_shared_one(
    accepting: str, fake_llm: FakeLLM
) -> None:
    """With "accept", a chat UI's first message (no session named) starts from nothing: it never
    sees, nor adds to, the shared default session."""
    for text in ("private one", "private two"):
        status, _ = await post(accepting, {"messages": [{"role": "user", "content": text}]})
        assert status == 200
    assert [m["role"] for m in fake_llm.requests[-1]["messages"]] == ["system", "user"]
    assert await sessions(accepting) == []


async def test_the_message_tool_works_on_a_resent_conversation(accepting: str, fake_llm: FakeLLM) -> None:
    """The agent's own tools still run: a `message` call's text is part of the answer, and the
    second model call holds the conversation, the call and its result."""
    fake_llm.push(Step(tool_calls=[("message", {"content": "on it"})]), Step(text="finished"))
    body = fixture("llm_cli.json")[1] | {"stream": False}
    status, data = await post(accepting, body)
    assert status == 200, data
    assert data["choices"][0]["message"]["content"] == "on it\n\nfinished"
    roles = [m["role"] for m in fake_llm.requests[-1]["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "tool"]
    assert await sessions(accepting) == []


async def test_a_document_in_an_earlier_message_is_read_again(accepting: str, fake_llm: FakeLLM) -> None:
    """A PDF sent as a file part in an earlier message is extracted like an upload, so a
    follow-up question about it has its text."""
    pdf = "data:application/pdf;base64," + base64.b64encode(make_pdf(["The secret is 4242."])).decode()
    body = {
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "summarize"},
                {"type": "file", "file": {"filename": "r.pdf", "file_data": pdf}},
            ]},
            {"role": "assistant", "content": "It is about a secret."},
            {"role": "user", "content": "which number?"},
        ]
    }  # fmt: skip
    status, data = await post(accepting, body)
    assert status == 200, data
    first_user = fake_llm.requests[-1]["messages"][1]["content"]
    assert "[File: r.pdf]" in first_user and "The secret is 4242." in first_user


async def test_files_across_the_conversation_share_one_max_files_budget(
    start_gateway: Callable[..., Awaitable[str]], fake_llm: FakeLLM
) -> None:
    """api.maxFiles bounds the images and files of the whole conversation, with a 400 naming the
    message that went over; the model is never called."""
    url = await start_gateway({"api": {"clientHistory": "accept", "maxFiles": 2}})
    png = "data:image/png;base64," + base64.b64encode(make_png()).decode()
    image = {"type": "image_url", "image_url": {"url": png}}
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, image, image]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "b"}, image]},
        ]
    }
    status, data = await post(url, body)
    assert status == 400, data
    assert data["error"]["param"] == "messages[2]" and "api.maxFiles" in data["error"]["message"]
    assert fake_llm.requests == []


# -- "accept": validation -----------------------------------------------------------------------

U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}


def calls(*ids: str) -> Json:
    """An assistant message calling a tool once per id."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids
        ],
    }


def result(call_id: object) -> Json:
    """A tool message answering ``call_id``."""
    return {"role": "tool", "tool_call_id": call_id, "content": "r"}


@pytest.mark.parametrize(
    ("messages", "param", "says"),
    [
        ([U, A, {"role": "function", "name": "f", "content": "x"}, U], "messages[2]", "role 'function'"),
        ([U, A], "messages[1]", "the last message must be the user's"),
        ([U, result("c1"), U], "messages[1]", "answers no call"),
        ([U, calls("c1"), result("c2"), U], "messages[2]", "answers no call"),
        ([U, calls("c1"), result("c1"), result("c1"), U], "messages[3]", "already answered"),
        ([U, calls("c1", "c2"), result("c1"), U], "messages[1]", "tool_calls[1] (id 'c2') has no 'tool'"),
        ([U, calls("c1"), U], "messages[1]", "has no 'tool' message"),
        ([U, {"role": "assistant", "content": None}, U], "messages[1]", "needs content or tool_calls"),
        ([U, calls("c1", "c1"), result("c1"), U], "messages[1]", "share one id"),
        ([U, calls("c1"), result(5), U], "messages[2]", "answers no call"),
        ([{"role": "user", "content": [{"type": "audio"}]}, A, U], "messages[0].content[0]", "unsupported"),
        ([U, {"role": "assistant", "content": "a", "tool_calls": "x"}, U], "messages[1]", "non-empty list"),
        ([U, A, {"role": "user", "content": "  "}], "messages[2]", "empty"),
        ([U, "text", U], "messages[1]", "must be an object with a 'role'"),
    ],
    ids=[
        "unknown role", "ends with assistant", "tool without call", "tool answers another id",
        "answered twice", "one call unanswered", "call never answered", "null content without calls",
        "duplicate call ids", "tool_call_id not a string", "bad part in an earlier message",
        "tool_calls not a list", "blank last message", "message not an object",
    ],
)  # fmt: skip
async def test_a_malformed_conversation_is_a_400_naming_the_message(
    accepting: str, fake_llm: FakeLLM, messages: list[object], param: str, says: str
) -> None:
    """Roles, order and tool results are checked: each mistake is a 400 naming messages[i], and
    the model is never called."""
    status, data = await post(accepting, {"messages": messages})
    assert status == 400, data
    assert data["error"]["param"] == param
    assert says in data["error"]["message"]
    assert fake_llm.requests == []


async def test_tool_results_may_come_in_any_order(accepting: str, fake_llm: FakeLLM) -> None:
    """Two parallel calls answered in the other order are accepted and sent on as they came."""
    status, data = await post(accepting, {"messages": [U, calls("c1", "c2"), result("c2"), result("c1"), U]})
    assert status == 200, data
    sent = fake_llm.requests[-1]["messages"]
    assert [m.get("tool_call_id") for m in sent if m["role"] == "tool"] == ["c2", "c1"]


# -- "accept": fuzzing ---------------------------------------------------------------------------

CALL_IDS = st.sampled_from(["c1", "c2", "", "c1 "]) | st.integers(0, 3) | st.none()
CALL = st.fixed_dictionaries(
    {"id": CALL_IDS},
    optional={
        "type": st.sampled_from(["function", "custom", 5]),
        "function": st.fixed_dictionaries(
            {},
            optional={"name": st.sampled_from(["f", "", 3]), "arguments": st.sampled_from(["{}", "", {}, 7])},
        )
        | st.none(),
    },
)
TURN = st.one_of(
    st.fixed_dictionaries(
        {"role": st.just("user"), "content": st.sampled_from(["q", "", [], [{"type": "text"}], 4])}
    ),
    st.fixed_dictionaries(
        {"role": st.just("assistant")},
        optional={
            "content": st.sampled_from(["a", None, "", [{"type": "refusal", "refusal": "no"}], 1]),
            "tool_calls": st.lists(CALL, max_size=3) | st.sampled_from([None, "x", {}]),
        },
    ),
    st.fixed_dictionaries(
        {"role": st.just("tool")},
        optional={"tool_call_id": CALL_IDS, "content": st.sampled_from(["r", None, ["x"]])},
    ),
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "function", "", None])},
        optional={"content": st.sampled_from(["s", None, [{"type": "text", "text": "t"}]])},
    ),
    st.sampled_from([None, "user", 3, []]),
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=st.lists(TURN, max_size=6), last=st.booleans())
async def test_random_conversations_get_clean_answers(
    accepting: str, caplog: pytest.LogCaptureFixture, messages: list[object], last: bool
) -> None:
    """Whatever a resent conversation holds, the answer is a 200 or a 4xx OpenAI error naming
    what is wrong: never a 5xx or a traceback."""
    if last:
        messages = [*messages, {"role": "user", "content": "go"}]
    async with asyncio.timeout(20):
        status, data = await post(accepting, {"messages": messages})
    assert status < 500, data
    if status >= 400:
        assert set(data["error"]) == {"message", "type", "param", "code"}, data
    else:
        assert data["object"] == "chat.completion", data
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
