"""The API side of tools: client tools refused, tool_choice none, response_format, progress events,
per-channel tool choice, bounded results, and tool images reaching the model."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from nanobot.agent.loop import AgentLoop
from nanobot.bus import ImageInput, InboundMessage, MessageBus, OutboundKind, OutboundMessage
from nanobot.config import AgentDefaults, ProviderConfig, parse_config
from nanobot.providers.base import ToolCall
from nanobot.providers.openai_compat import OpenAICompatProvider
from nanobot.storage.sessions import SessionStore
from nanobot.tools import Tool, ToolContext, ToolRegistry, ToolResult
from nanobot.tools_config import ToolsConfig
from tool_calls import call_on

from conftest import MODEL
from fake_llm import FakeLLM, Step
from samples import make_png

Gateway = Callable[..., Awaitable[str]]


async def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "extra",
    [
        {
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
            ]
        },
        {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"tool_choice": "required"},
    ],
)
async def test_client_side_tools_are_refused(gateway: str, fake_llm: FakeLLM, extra: dict[str, Any]) -> None:
    """A request bringing its own tools gets a 400 naming `tools`, instead of tools silently dropped."""
    status, body = await post(gateway, {"messages": USER, **extra})
    assert status == 400
    assert body["error"]["param"] == "tools"
    assert "runs its own tools" in body["error"]["message"]
    assert fake_llm.requests == []


async def test_client_tools_refused_through_the_sdk(client: openai.AsyncOpenAI) -> None:
    """The openai SDK raises BadRequestError for client tools."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=USER, tools=[weather])  # type: ignore[list-item]
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "tools"


async def test_empty_tools_and_auto_are_accepted(gateway: str, fake_llm: FakeLLM) -> None:
    """`tools: []` and `tool_choice: "auto"` change nothing: the server's tools are offered."""
    status, _ = await post(gateway, {"messages": USER, "tools": [], "tool_choice": "auto"})
    assert status == 200
    assert "message" in [t["function"]["name"] for t in fake_llm.requests[0]["tools"]]


async def test_tool_choice_none_offers_no_tools(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """tool_choice none: the upstream gets no tools, and a tool call it makes anyway runs nothing."""
    fake_llm.push(Step(tool_calls=[("write_file", {"path": "x", "content": "y"})]), Step(text="plain"))
    resp = await client.chat.completions.create(model=MODEL, messages=USER, tool_choice="none")
    assert resp.choices[0].message.content == "plain"
    assert "tools" not in fake_llm.requests[0]
    assert fake_llm.requests[1]["messages"][-1]["content"].startswith("Error: no tools are available")


async def test_response_format_reaches_the_upstream(client: openai.AsyncOpenAI, fake_llm: FakeLLM) -> None:
    """json_schema structured output is passed to the upstream for every call of the turn."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    fake_llm.push(Step(tool_calls=[("list_dir", {"path": "."})]), Step(text='{"city": "Oslo"}'))
    resp = await client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt)  # type: ignore[arg-type]
    assert orjson.loads(resp.choices[0].message.content or "") == {"city": "Oslo"}
    assert [r["response_format"] for r in fake_llm.requests] == [fmt, fmt]


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "yaml"}, "response_format"),
        ("json", "response_format"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
            "response_format.json_schema.schema",
        ),
    ],
)
async def test_bad_response_format_is_a_400(gateway: str, fake_llm: FakeLLM, fmt: object, param: str) -> None:
    """A malformed response_format is refused naming the field, before any upstream call."""
    status, body = await post(gateway, {"messages": USER, "response_format": fmt})
    assert status == 400 and body["error"]["param"] == param
    assert fake_llm.requests == []


async def test_json_object_and_text_formats(gateway: str, fake_llm: FakeLLM) -> None:
    """json_object is passed on; text (the default) sends nothing extra."""
    assert (await post(gateway, {"messages": USER, "response_format": {"type": "json_object"}}))[0] == 200
    assert (await post(gateway, {"messages": USER, "response_format": {"type": "text"}}))[0] == 200
    assert fake_llm.requests[0]["response_format"] == {"type": "json_object"}
    assert "response_format" not in fake_llm.requests[1]


async def sse_events(url: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """(event name, data) of every SSE event of a streamed request, in order."""
    events: list[tuple[str, str]] = []
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        raw = (await r.read()).decode()
    for block in raw.split("\n\n"):
        name, data = "message", ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        if data:
            events.append((name, data))
    return events


async def test_tool_progress_events_when_asked(start_gateway: Gateway, fake_llm: FakeLLM) -> None:
    """include_tool_events adds started/finished/failed events, in order with the text."""
    url = await start_gateway()
    fake_llm.push(
        Step(text="Looking.", tool_calls=[("write_file", {"path": "a.txt", "content": "x"}), ("nope", {})]),
        Step(text="Done."),
    )
    body = {"messages": USER, "stream": True, "stream_options": {"include_tool_events": True}}
    events = await sse_events(url, body)
    progress = [orjson.loads(d) for name, d in events if name == "nanobot.tool.progress"]
    assert [(p["tool"], p["status"]) for p in progress] == [
        ("write_file", "started"),
        ("write_file", "finished"),
        ("nope", "failed"),
    ]
    assert progress[0]["summary"] == "a.txt" and progress[0]["call_id"] == progress[1]["call_id"]
    assert progress[2]["summary"] == "Error: unknown tool 'nope'"
    order = [
        ("tool" if n != "message" else orjson.loads(d)["choices"][0]["delta"].get("content"))
        for n, d in events[:-1]
    ]
    text_before = order.index("tool")
    assert "Looking." in "".join(x for x in order[:text_before] if isinstance(x, str))
    assert events[-1] == ("message", "[DONE]")


async def test_a_form_upload_can_ask_for_tool_events(start_gateway: Gateway, fake_llm: FakeLLM) -> None:
    """A multipart request (the web chat's uploads) asks for tool events with its
    include_tool_events field; without it the stream carries none."""
    url = await start_gateway()
    write = Step(tool_calls=[("write_file", {"path": "a.txt", "content": "x"})])
    for asked in (True, False):
        fake_llm.push(write, Step(text="Done."))
        form = aiohttp.FormData()
        form.add_field("message", "summarize")
        form.add_field("stream", "true")
        if asked:
            form.add_field("include_tool_events", "true")
        form.add_field("files", b"hello", filename="note.txt", content_type="text/plain")
        async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", data=form) as r:
            assert r.status == 200
            raw = (await r.read()).decode()
        assert ("event: nanobot.tool.progress" in raw) is asked, raw
        assert raw.rstrip().endswith("data: [DONE]")


async def test_no_tool_events_unless_asked(
    client: openai.AsyncOpenAI, gateway: str, fake_llm: FakeLLM
) -> None:
    """Without the option the stream is plain OpenAI: the SDK reads only chunks, no unknown events."""
    fake_llm.push(Step(tool_calls=[("write_file", {"path": "a.txt", "content": "x"})]), Step(text="Done."))
    stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Done."
    fake_llm.push(Step(tool_calls=[("write_file", {"path": "b.txt", "content": "x"})]), Step(text="Done."))
    events = await sse_events(gateway, {"messages": USER, "stream": True})
    assert {name for name, _ in events} == {"message"}


async def test_per_channel_tool_choice(start_gateway: Gateway, fake_llm: FakeLLM) -> None:
    """tools.channels.api.enabled offers the API fewer tools, and a call to another one runs nothing."""
    url = await start_gateway(
        {"tools": {"enabled": ["*"], "channels": {"api": {"enabled": ["message", "read_*"]}}}}
    )
    text = await call_on(url, fake_llm, "write_file", {"path": "a", "content": "b"})
    assert text == "Error: unknown tool 'write_file'"
    assert [t["function"]["name"] for t in fake_llm.requests[0]["tools"]] == ["message", "read_file"]


async def test_default_tools_offered(gateway: str, fake_llm: FakeLLM) -> None:
    """By default the model gets message, web_fetch and the file tools; exec is not among them."""
    await post(gateway, {"messages": USER})
    names = [t["function"]["name"] for t in fake_llm.requests[0]["tools"]]
    assert names == ["message", "web_fetch", "read_file", "write_file", "edit_file", "list_dir"]


async def test_big_results_are_bounded(start_gateway: Gateway, fake_llm: FakeLLM, tmp_path: Path) -> None:
    """A result past tools.maxResultChars is cut, with a marker the model can see."""
    url = await start_gateway({"tools": {"maxResultChars": 1000}})
    await call_on(url, fake_llm, "write_file", {"path": "big.txt", "content": "z" * 5000})
    text = await call_on(url, fake_llm, "read_file", {"path": "big.txt"})
    marker = (
        "[truncated: the result has 5,000 characters; only the first 1,000 are shown (tools.maxResultChars)]"
    )
    assert text == "z" * 1000 + "\n\n" + marker


class Picture(Tool):
    """A tool that returns an image, as an MCP server's screenshot tool would."""

    name = "picture"
    description = "A picture."
    parameters: dict[str, Any] = {"type": "object", "properties": {}}  # noqa: RUF012

    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult | str:
        return ToolResult(
            "one image", images=(ImageInput("shot.png", "image/png", base64.b64encode(make_png()).decode()),)
        )


class Broken(Tool):
    """A tool with a bug."""

    name = "broken"
    description = "Raises."
    parameters: dict[str, Any] = {"type": "object", "properties": {}}  # noqa: RUF012

    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult | str:
        raise KeyError("oops")


class Outbox:
    """What the agent published, and an event per finished turn."""

    def __init__(self) -> None:
        self.messages: list[OutboundMessage] = []
        self.ended: dict[str, asyncio.Event] = {}

    def put(self, msg: OutboundMessage) -> None:
        self.messages.append(msg)
        if msg.kind in (OutboundKind.REPLY, OutboundKind.ERROR):
            self.ended.setdefault(msg.reply_to, asyncio.Event()).set()

    async def turn(self, bus: MessageBus, rid: str) -> OutboundMessage:
        """Run one turn and return how it ended."""
        ended = self.ended.setdefault(rid, asyncio.Event())
        bus.publish_inbound(InboundMessage("api", "s", "look", request_id=rid))
        async with asyncio.timeout(10):
            await ended.wait()
        return next(
            m
            for m in self.messages
            if m.reply_to == rid and m.kind in (OutboundKind.REPLY, OutboundKind.ERROR)
        )


@pytest.fixture
async def agent(fake_llm: FakeLLM, tmp_path: Path) -> AsyncIterator[tuple[MessageBus, Outbox]]:
    """A real agent loop (provider → fake LLM, sqlite sessions) with the Picture and Broken tools."""
    bus = MessageBus()
    out = Outbox()
    bus.attach_outbound(out.put)
    provider = OpenAICompatProvider(ProviderConfig(api_base=fake_llm.url), model=MODEL)  # type: ignore[attr-defined]
    await provider.start()
    sessions = await SessionStore.open(tmp_path)
    loop = AgentLoop(
        bus, provider, sessions, ToolRegistry([Picture(), Broken()]), AgentDefaults(), turn_timeout=30
    )
    task = asyncio.create_task(loop.run())
    yield bus, out
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await provider.close()
    await sessions.close()


async def test_tool_images_reach_the_model_and_history_keeps_a_placeholder(
    agent: tuple[MessageBus, Outbox], fake_llm: FakeLLM
) -> None:
    """An image from a tool goes to the model as a user image part after the tool messages; the
    stored history holds `[image: name]` instead of the picture."""
    bus, out = agent
    fake_llm.push(Step(tool_calls=[("picture", {}), ("broken", {})]), Step(text="I see it."))
    assert (await out.turn(bus, "r1")).content == "I see it."
    sent = fake_llm.requests[1]["messages"]
    assert [m["role"] for m in sent[-4:]] == ["assistant", "tool", "tool", "user"]
    assert sent[-3]["content"] == "one image"
    assert sent[-2]["content"] == "Error: broken failed: KeyError: 'oops'"
    image_parts = [p for p in sent[-1]["content"] if p["type"] == "image_url"]
    assert image_parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    await out.turn(bus, "r2")
    history = fake_llm.requests[2]["messages"]
    assert history[5] == {"role": "user", "content": "[image: shot.png]"}
    assert "base64" not in orjson.dumps(history).decode()


class Source:
    """A dynamic tool set, as an MCP server's while it is up."""

    def __init__(self) -> None:
        self.current: Sequence[Tool] = ()

    def tools(self) -> Sequence[Tool]:
        return self.current


async def test_registry_follows_its_sources_and_caches(tmp_path: Path) -> None:
    """Definitions are rebuilt when a source's tools change, and reused while they do not."""
    source = Source()
    registry = ToolRegistry([Broken()], [source], ToolsConfig(enabled=["broken", "pic*"]))
    first = registry.definitions("api")
    assert [d["function"]["name"] for d in first] == ["broken"]
    assert registry.definitions("api") is first  # cached: nothing changed
    source.current = [Picture()]
    assert registry.names("api") == ["broken", "picture"]
    ctx = ToolContext(MessageBus(), "api", "c", "r")
    result = await registry.execute(ToolCall("1", "picture", "{}"), ctx)
    assert result.text == "one image" and len(result.images) == 1
    source.current = []  # the server went away: its tools are no longer offered nor run
    assert registry.names("api") == ["broken"]
    gone = await registry.execute(ToolCall("2", "picture", "{}"), ctx)
    assert gone.is_error and gone.text == "Error: unknown tool 'picture'"


def test_tools_config_is_parsed() -> None:
    """The tools section reads nanobot's camelCase keys."""
    config = parse_config(
        {
            "tools": {
                "enabled": ["message"],
                "exec": {"enable": True, "timeout": 5},
                "web": {"allowPrivate": True},
            }
        }
    )
    assert config.tools.enabled == ["message"] and config.tools.exec.enable and config.tools.exec.timeout == 5
    assert config.tools.web.allow_private
