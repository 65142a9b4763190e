"""The agent's tools: the registry, ``message``, web fetch, workspace files, exec (and MCP)."""

from nanobot.tools.base import Tool, ToolContext, ToolResult, ToolSource
from nanobot.tools.message import MessageTool
from nanobot.tools.registry import ToolRegistry

__all__ = ["MessageTool", "Tool", "ToolContext", "ToolRegistry", "ToolResult", "ToolSource"]
