"""The hot-path value classes stay values: equal, hashable and replaceable like frozen
dataclasses, and frozen where it is checked (``mypy --strict`` rejects assigning a field)."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

from mypy import api as mypy_api

from nanobot.bus import InboundMessage, OutboundKind, OutboundMessage, Usage


def test_messages_compare_hash_and_replace_like_frozen_dataclasses() -> None:
    """Two equal messages are equal; replace() gives a new message, the old one unchanged; usage hashes."""
    a = InboundMessage("api", "s1", "hi", request_id="t1")
    assert a == InboundMessage("api", "s1", "hi", request_id="t1")
    c = dataclasses.replace(a, content="bye")
    assert c.content == "bye" and a.content == "hi"
    out = OutboundMessage("api", "s1", "x", OutboundKind.REPLY, "t1", usage=Usage(1, 2, 3))
    assert dataclasses.replace(out) == out and dataclasses.replace(out, content="y") != out
    assert {Usage(1, 2, 3) + Usage(1, 1, 1), Usage(2, 3, 4)} == {Usage(2, 3, 4)}


def test_assigning_a_field_is_a_type_error(tmp_path: Path) -> None:
    """Code that writes into a message or a parsed request fails `mypy --strict`, as for frozen=True."""
    snippet = tmp_path / "writes.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from nanobot.bus import InboundMessage, Usage
            from nanobot.gateway.requests import ChatRequest
            from nanobot.providers.base import LLMResponse

            def f(m: InboundMessage, r: ChatRequest, a: LLMResponse, u: Usage) -> None:
                m.content = "changed"
                r.text = "changed"
                a.content = "changed"
                u.total_tokens = 0
            """
        )
    )
    out, _err, status = mypy_api.run(["--strict", "--no-incremental", str(snippet)])
    assert status == 1
    assert out.count("is read-only") == 4, out
