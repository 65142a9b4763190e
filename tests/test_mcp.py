"""MCP servers as tools, through the real gateway: real servers (the SDK demo, mcp-server-time), a
scripted upstream that calls their tools, and what the model receives back."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from mcp_support import LogWatch, http_server, stdio_server, watch_mcp_log
from nanobot.config import parse_config
from nanobot.errors import ConfigError
from nanobot.redact import config_secrets

from conftest import MODEL
from fake_llm import FakeLLM, Step

Gateway = Callable[..., Awaitable[str]]
FAST_RETRY = {"channels": {"retryBaseSeconds": 0.02, "retryMaxSeconds": 0.2}}


@pytest.fixture
async def log() -> AsyncIterator[LogWatch]:
    """The MCP logger's records."""
    async with watch_mcp_log() as watch:
        yield watch


@pytest.fixture
async def start(start_gateway: Gateway) -> AsyncIterator[Callable[..., Awaitable[openai.AsyncOpenAI]]]:
    """Start a gateway with these MCP servers (not waiting for them); an openai client for it."""
    clients: list[openai.AsyncOpenAI] = []

    async def run(servers: dict[str, Any]) -> openai.AsyncOpenAI:
        url = await start_gateway({"tools": {"mcpServers": servers}, **FAST_RETRY})
        clients.append(openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="dummy", max_retries=0))
        return clients[-1]

    yield run
    for client in clients:
        await client.close()


Start = Callable[..., Awaitable[openai.AsyncOpenAI]]


async def ask(client: openai.AsyncOpenAI, text: str = "go") -> str:
    """One non-streamed turn; its answer."""
    reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content or ""


def offered(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The functions an upstream request offered, by name."""
    return {t["function"]["name"]: t["function"] for t in body.get("tools", [])}


def tool_results(body: dict[str, Any]) -> list[str]:
    """The tool messages' texts in an upstream request."""
    return [m["content"] for m in body["messages"] if m["role"] == "tool"]


async def call_once(client: openai.AsyncOpenAI, llm: FakeLLM, tool: str, args: dict[str, Any]) -> str:
    """Script one call of ``tool`` and an answer; what the model got back from the tool."""
    llm.push(Step(tool_calls=[(tool, args)]), Step(text="done"))
    assert await ask(client) == "done"
    return tool_results(llm.requests[-1])[-1]


async def test_stdio_server_tools_are_offered_and_called(
    start: Start, fake_llm: FakeLLM, log: LogWatch
) -> None:
    """A stdio MCP server's tools reach the model as mcp_<server>_<tool>, and a call returns its text."""
    client = await start({"demo": stdio_server()})
    await log.wait_for("MCP server demo is up")
    assert await call_once(client, fake_llm, "mcp_demo_echo", {"text": "hi"}) == "demo says: hi"
    echo = offered(fake_llm.requests[0])["mcp_demo_echo"]
    assert echo["description"] == "Echo the text back (demo)."
    assert echo["parameters"]["type"] == "object" and echo["parameters"]["required"] == ["text"]
    assert "message" in offered(fake_llm.requests[0])


async def test_images_errors_and_structured_content(start: Start, fake_llm: FakeLLM, log: LogWatch) -> None:
    """An image becomes an image the model sees, isError an error text, structuredContent JSON."""
    client = await start({"demo": stdio_server()})
    await log.wait_for("MCP server demo is up")
    text = await call_once(client, fake_llm, "mcp_demo_picture", {})
    assert text.startswith("a red dot\n[image 1: image/png")
    images = [
        part["image_url"]["url"]
        for m in fake_llm.requests[-1]["messages"]
        if m["role"] == "user" and isinstance(m["content"], list)
        for part in m["content"]
        if part["type"] == "image_url"
    ]
    assert len(images) == 1 and images[0].startswith("data:image/png;base64,iVBORw0KGgo")
    failed = await call_once(client, fake_llm, "mcp_demo_fail", {"reason": "no disk"})
    assert failed.startswith("Error: fail failed:") and "cannot do that: no disk" in failed
    weather = await call_once(client, fake_llm, "mcp_demo_weather", {"city": "Oslo"})
    assert orjson.loads(weather) == {"city": "Oslo", "celsius": 21}


async def test_a_slow_call_times_out_and_the_server_stays_up(
    start: Start, fake_llm: FakeLLM, log: LogWatch
) -> None:
    """A call past toolTimeout is an error text for the model; the turn and the server carry on."""
    client = await start({"demo": stdio_server(toolTimeout=0.3)})
    await log.wait_for("MCP server demo is up")
    text = await call_once(client, fake_llm, "mcp_demo_slow", {"seconds": 30})
    assert text == "Error: slow on MCP server demo timed out after 0.3s"
    assert await call_once(client, fake_llm, "mcp_demo_echo", {"text": "still"}) == "demo says: still"
    assert log.count("MCP server demo is up") == 1


async def test_a_server_that_exits_mid_call_is_restarted(
    start: Start, fake_llm: FakeLLM, log: LogWatch
) -> None:
    """A stdio server exiting during a call gives an error result; it is restarted and works again."""
    client = await start({"demo": stdio_server()})
    await log.wait_for("MCP server demo is up")
    text = await call_once(client, fake_llm, "mcp_demo_crash", {})
    assert text == "Error: MCP server demo stopped during the call; it is being restarted"
    await log.wait_for("MCP server demo is up", times=2)
    assert await call_once(client, fake_llm, "mcp_demo_echo", {"text": "back"}) == "demo says: back"
    failures = [r for r in log.records if "retrying in" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is None and "\n" not in failures[0].getMessage()


async def test_streamable_http_server_with_headers(start: Start, fake_llm: FakeLLM, log: LogWatch) -> None:
    """An HTTP MCP server is called with the configured headers; its tools work like stdio ones."""
    async with http_server() as (url, _proc):
        server = {"url": url, "headers": {"X-Demo": "from-config"}}
        client = await start({"web": server})
        await log.wait_for("MCP server web is up")
        assert await call_once(client, fake_llm, "mcp_web_echo", {"text": "hi"}) == "web says: hi"
        assert await call_once(client, fake_llm, "mcp_web_header", {}) == "from-config"


async def test_http_server_that_dies_is_no_longer_offered(
    start: Start, fake_llm: FakeLLM, log: LogWatch
) -> None:
    """An HTTP server that exits mid-call: an error result, one log line, and its tools are withdrawn."""
    async with http_server() as (url, _proc):
        client = await start({"web": {"url": url}, "demo": stdio_server()})
        await log.wait_for("MCP server web is up")
        await log.wait_for("MCP server demo is up")
        text = await call_once(client, fake_llm, "mcp_web_crash", {})
        assert text == "Error: MCP server web stopped during the call; it is being restarted"
    await log.wait_for("MCP server web cannot start")
    await ask(client)
    names = offered(fake_llm.requests[-1])
    assert "mcp_demo_echo" in names and not any(n.startswith("mcp_web_") for n in names)
    assert all(r.exc_info is None for r in log.records)


async def test_published_time_server_runs_unmodified(start: Start, fake_llm: FakeLLM, log: LogWatch) -> None:
    """mcp-server-time from PyPI, run as published: its get_current_time tool answers for UTC."""
    server = {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}
    client = await start({"time": server})
    await log.wait_for("MCP server time is up")
    await ask(client)
    assert {"mcp_time_get_current_time", "mcp_time_convert_time"} <= set(offered(fake_llm.requests[-1]))
    text = await call_once(client, fake_llm, "mcp_time_get_current_time", {"timezone": "UTC"})
    assert orjson.loads(text)["timezone"] == "UTC"


async def test_a_server_that_fails_to_start_comes_up_later(
    start: Start, fake_llm: FakeLLM, log: LogWatch, tmp_path: Path
) -> None:
    """A failing server: /health is fine, the others' tools are offered, its are not, until it comes up."""
    blocker = tmp_path / "not-yet"
    blocker.touch()
    flaky = stdio_server("--name", "flaky", "--fail-while", str(blocker))
    client = await start({"flaky": flaky, "demo": stdio_server()})
    async with aiohttp.ClientSession() as http, http.get(str(client.base_url.join("/health"))) as health:
        assert health.status == 200
    await log.wait_for("MCP server demo is up")
    await log.wait_for("MCP server flaky cannot start")
    await ask(client)
    names = offered(fake_llm.requests[-1])
    assert "mcp_demo_echo" in names and not any(n.startswith("mcp_flaky_") for n in names)
    blocker.unlink()
    await log.wait_for("MCP server flaky is up")
    assert await call_once(client, fake_llm, "mcp_flaky_echo", {"text": "x"}) == "flaky says: x"
    failures = [r for r in log.records if "MCP server flaky cannot start" in r.getMessage()]
    assert failures and all(r.exc_info is None and "\n" not in r.getMessage() for r in failures)


async def test_enabled_tools_limits_what_is_offered(start: Start, fake_llm: FakeLLM, log: LogWatch) -> None:
    """enabledTools offers only the listed tools (raw or mcp_ names)."""
    client = await start({"demo": stdio_server(enabledTools=["echo", "mcp_demo_picture"])})
    await log.wait_for("MCP server demo is up")
    await ask(client)
    assert sorted(n for n in offered(fake_llm.requests[-1]) if n.startswith("mcp_")) == [
        "mcp_demo_echo",
        "mcp_demo_picture",
    ]


async def test_names_and_schemas_are_made_acceptable_to_providers(
    start: Start, fake_llm: FakeLLM, log: LogWatch
) -> None:
    """Dotted, over-long and colliding names become unique [A-Za-z0-9_-]{1,64}; $ref schemas are inlined."""
    client = await start({"x.y": stdio_server("--name", "dotted"), "x_y": stdio_server("--name", "plain")})
    await log.wait_for("MCP server x.y is up")
    await log.wait_for("MCP server x_y is up")
    await ask(client)
    tools = offered(fake_llm.requests[-1])
    names = [n for n in tools if n.startswith("mcp_")]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n) for n in names) and len(set(names)) == len(names) == 22
    assert "mcp_x_y_echo" in names and "mcp_x_y_plan_trip" in names
    (other_echo,) = [n for n in names if n.startswith("mcp_x_y_echo_")]  # the second server's, hashed
    plan = tools["mcp_x_y_plan_trip"]["parameters"]
    assert "$ref" not in orjson.dumps(plan).decode() and "$defs" not in plan
    trip = plan["properties"]["plan"]["properties"]["trips"]["items"]
    assert trip["required"] == ["city", "days"]
    assert await call_once(client, fake_llm, "mcp_x_y_echo", {"text": "a"}) == "dotted says: a"
    assert await call_once(client, fake_llm, other_echo, {"text": "b"}) == "plain says: b"
    args = {"plan": {"trips": [{"city": "Rome", "days": 3}]}}
    assert (
        await call_once(client, fake_llm, "mcp_x_y_plan_trip", args) == "1 trip(s), first to Rome for 3 days"
    )


async def test_server_secrets_are_redacted(start: Start, fake_llm: FakeLLM, log: LogWatch) -> None:
    """headers and env of an MCP server are secrets: kept out of reprs, and of error texts quoting them."""
    secret = "mcp-env-token-0123456789"
    client = await start({"demo": stdio_server(env={"DEMO_TOKEN": secret}, headers={})})
    await log.wait_for("MCP server demo is up")
    text = await call_once(client, fake_llm, "mcp_demo_fail", {"reason": f"token {secret} refused"})
    assert text == "Error: fail failed: Error executing tool fail: cannot do that: token [redacted] refused"
    config = parse_config(
        {"tools": {"mcpServers": {"h": {"url": "http://127.0.0.1:1/mcp", "headers": {"A": secret}}}}}
    )
    assert secret in config_secrets(config) and secret not in repr(config)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({}, "tools.mcpServers.s: give either command (a stdio server) or url (an HTTP server)"),
        ({"command": "x", "url": "http://h/mcp"}, "tools.mcpServers.s: give either command"),
        ({"url": "ftp://h/mcp"}, "tools.mcpServers.s.url: expected a URL starting with http://"),
        ({"url": "http://h/sse", "type": "sse"}, "(the old SSE transport is not supported)"),
        ({"command": "x", "type": "streamableHttp"}, "tools.mcpServers.s: type streamableHttp needs url"),
        ({"command": "x", "toolTimeout": 0}, "tools.mcpServers.s.toolTimeout: must be greater than 0"),
    ],
)
def test_bad_server_config_is_one_clear_error(server: dict[str, Any], message: str) -> None:
    """A server entry that cannot work is refused at start with the key that is wrong."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"tools": {"mcpServers": {"s": server}}})
    assert message in caught.value.message


async def test_a_server_that_changes_its_tools_is_listed_again(
    start: Start, fake_llm: FakeLLM, log: LogWatch
) -> None:
    """notifications/tools/list_changed: the new tool is offered from the next model call on."""
    client = await start({"demo": stdio_server()})
    await log.wait_for("MCP server demo is up")
    assert await call_once(client, fake_llm, "mcp_demo_grow", {}) == "grew"
    await log.wait_for("MCP server demo changed its tools")
    assert await call_once(client, fake_llm, "mcp_demo_grown", {}) == "grown up"
    assert "mcp_demo_grown" in offered(fake_llm.requests[-1])


async def test_results_are_bounded_before_the_model_sees_them(
    start: Start, fake_llm: FakeLLM, log: LogWatch
) -> None:
    """Huge text is cut to tools.maxResultChars; at most 4 images pass, and only real images."""
    relative = stdio_server(cwd=str(Path(__file__).parent), args=["mcp_demo.py", "stdio"])  # cwd is used
    client = await start({"demo": relative})
    await log.wait_for("MCP server demo is up")
    flood = await call_once(client, fake_llm, "mcp_demo_flood", {"chars": 200_000})
    assert flood.startswith("x" * 50_000) and "[truncated: the result has 200,000 characters" in flood
    text = await call_once(client, fake_llm, "mcp_demo_picture", {"count": 6})
    assert text.count("shown below") == 4 and text.count("only 4 images per tool result") == 2
    bogus = await call_once(client, fake_llm, "mcp_demo_picture", {"bogus": True})
    assert "[image omitted: not a PNG, JPEG, GIF or WebP image (declared image/png)]" in bogus
    assert not any(isinstance(m["content"], list) for m in fake_llm.requests[-1]["messages"][-2:])


async def test_an_http_url_with_a_key_stays_out_of_the_log(
    start: Start, fake_llm: FakeLLM, log: LogWatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A server URL whose query holds a key: its failures and requests are logged without the key."""
    caplog.set_level(logging.INFO)
    url = fake_llm.url.replace("/v1", "/mcp?key=sk-query-secret-0123")  # type: ignore[attr-defined]
    await start({"nomcp": {"url": url}})
    await log.wait_for("MCP server nomcp cannot start")
    ours = [r.getMessage() for r in caplog.records if r.name != "aiohttp.access"]  # not the fake's log
    assert ours and not any("sk-query-secret-0123" in line for line in ours)


def test_the_sdk_is_not_imported_at_start() -> None:
    """Start-up does not pay for importing the MCP SDK (about a second): it loads in the background."""
    code = "import sys, nanobot.runtime, nanobot.cli; sys.exit('mcp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
