"""The agent: one turn is context → LLM → tools → answer."""

from nanobot.agent.loop import AgentLoop
from nanobot.agent.tools import Tool, ToolContext, ToolRegistry

__all__ = ["AgentLoop", "Tool", "ToolContext", "ToolRegistry"]
