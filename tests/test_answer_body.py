"""The JSON answer is written from a template around what varies: it must stay exactly the
OpenAI chat.completion object, whatever the text, finish reason and usage."""

from __future__ import annotations

import aiohttp
import orjson

from conftest import MODEL
from fake_llm import FakeLLM, Step

_AWKWARD = 'a "quote", a \\ backslash, a\nnewline, a \t tab, é, 😀, \u2028, </script>, %s %d %%'


async def test_any_text_finish_reason_and_usage_come_back_exactly(gateway: str, fake_llm: FakeLLM) -> None:
    """Quotes, backslashes, control characters, non-ASCII and % signs in the answer, an unusual
    finish reason and large token counts arrive unchanged, in a body with exactly OpenAI's fields."""
    fake_llm.push(Step(text=_AWKWARD, finish_reason='len"gth', usage=(123456789, 7)))
    body = {"messages": [{"role": "user", "content": "hi"}], "session_id": "awkward"}
    async with aiohttp.ClientSession() as s, s.post(f"{gateway}/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.content_type == "application/json"
        data = orjson.loads(await r.read())
    assert list(data) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert data["id"].startswith("chatcmpl-") and data["id"].isascii()
    assert data["object"] == "chat.completion" and isinstance(data["created"], int)
    assert data["model"] == MODEL and data["system_fingerprint"] is None
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": _AWKWARD, "refusal": None},
            "logprobs": None,
            "finish_reason": 'len"gth',
        }
    ]
    assert data["usage"] == {"prompt_tokens": 123456789, "completion_tokens": 7, "total_tokens": 123456796}
