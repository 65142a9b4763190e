"""LLM providers: every one speaks the OpenAI chat-completions protocol."""

from nanobot.providers.base import LLMResponse, ToolCall
from nanobot.providers.openai_compat import OpenAICompatProvider

__all__ = ["LLMResponse", "OpenAICompatProvider", "ToolCall"]
