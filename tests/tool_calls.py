"""Run one scripted tool call through a real gateway and read what the model was given back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai

from conftest import MODEL
from fake_llm import FakeLLM, Step


async def call_tool(
    start_gateway: Callable[..., Awaitable[str]],
    fake_llm: FakeLLM,
    tool: str,
    args: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> str:
    """Start a gateway with ``config``, have the model call ``tool`` once, return the tool's result text."""
    url = await start_gateway(config)
    return await call_on(url, fake_llm, tool, args)


async def call_on(url: str, fake_llm: FakeLLM, tool: str, args: dict[str, Any]) -> str:
    """On the gateway at ``url``: the model calls ``tool`` once; the tool message it got back."""
    seen = len(fake_llm.requests)
    fake_llm.push(Step(tool_calls=[(tool, args)]), Step(text="done"))
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as client:
        resp = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}])
    assert resp.choices[0].message.content == "done"
    result = fake_llm.requests[seen + 1]["messages"][-1]
    assert result["role"] == "tool"
    content = result["content"]
    assert isinstance(content, str)
    return content
