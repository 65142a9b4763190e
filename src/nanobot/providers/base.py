"""What a provider returns: the model's answer for one call."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanobot.bus import Usage
from nanobot.valueclass import valueclass


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model asked for; ``arguments`` is the raw JSON text."""

    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict[str, object]:
        """The OpenAI ``tool_calls[]`` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@valueclass  # one per upstream call: see nanobot.valueclass
class LLMResponse:
    """The model's answer to one chat-completions call."""

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)


def parse_usage(data: object) -> Usage:
    """The ``usage`` object of a completion or of a stream's last chunk."""
    if not isinstance(data, dict):
        return Usage()
    p = int(data.get("prompt_tokens") or 0)
    c = int(data.get("completion_tokens") or 0)
    return Usage(p, c, int(data.get("total_tokens") or p + c))
