"""The provider serialises the tool definitions once while they stay the same: the upstream must
still get exactly the definitions passed on each call, changed ones included."""

from __future__ import annotations

from typing import Any

from nanobot.config import ProviderConfig
from nanobot.providers.openai_compat import OpenAICompatProvider

from conftest import MODEL
from fake_llm import FakeLLM, Step


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


async def test_each_call_sends_the_tools_it_was_given(fake_llm: FakeLLM) -> None:
    """Same tuple twice, then a new tuple, a list, and none: the upstream sees each as given."""
    provider = OpenAICompatProvider(ProviderConfig(api_base=fake_llm.url), model=MODEL)  # type: ignore[attr-defined]
    await provider.start()
    try:
        first = (_tool("a"), _tool("b"))
        changed = (_tool("c"),)
        as_list = [_tool("d")]
        for tools in (first, first, changed, as_list, ()):
            fake_llm.push(Step(text="ok"))
            await provider.chat([{"role": "user", "content": "hi"}], tools=tools)
    finally:
        await provider.close()
    sent = [r.get("tools") for r in fake_llm.requests]
    assert sent == [list(first), list(first), list(changed), as_list, None]
