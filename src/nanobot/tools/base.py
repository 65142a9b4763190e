"""What every tool is: a name, a JSON-schema of its arguments, and ``execute``.

Tools come from two places: static ones registered once (``message``, web, files, exec),
and :class:`ToolSource` objects whose set changes at run time (an MCP server that starts,
dies or comes back). The :class:`~nanobot.tools.registry.ToolRegistry` holds both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nanobot.bus import ImageInput, MessageBus

SUMMARY_CHARS = 200  # a progress event's summary: a glance, not the result


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Where the turn that runs a tool came from."""

    bus: MessageBus
    channel: str
    chat_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool call gives the model: text, images (sent as a user message after the tool
    message: most providers accept no image in a tool message), and whether it failed."""

    text: str
    images: tuple[ImageInput, ...] = ()
    is_error: bool = False


class Tool(ABC):
    """A function the model may call.

    ``name``, ``description`` and ``parameters`` (a JSON schema object) may be class
    attributes (built-ins) or set per instance (MCP tools). ``execute`` gets arguments
    already parsed, with the schema's required keys present; it may return a plain string.
    """

    name: str
    description: str
    parameters: dict[str, Any]

    @abstractmethod
    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult | str:
        """Run the tool with parsed ``args``."""

    def summarize(self, args: dict[str, Any]) -> str:
        """A short human text for progress events: what this call is about (the URL, the path)."""
        for value in args.values():
            if isinstance(value, str) and value:
                return shorten(value)
        return ""

    def definition(self) -> dict[str, Any]:
        """The OpenAI ``tools[]`` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class ToolSource(Protocol):
    """A set of tools that changes at run time (an MCP server's, while it is up)."""

    def tools(self) -> Sequence[Tool]:
        """The tools available now (empty while the source is down). Called on every turn: keep it cheap."""
        ...


def shorten(text: str, limit: int = SUMMARY_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
