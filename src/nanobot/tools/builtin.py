"""The built-in tools a config asks for: ``message``, ``web_fetch``, the file tools and (opt-in) ``exec``."""

from __future__ import annotations

from nanobot.config import Config
from nanobot.tools.base import Tool
from nanobot.tools.exec import ExecTool
from nanobot.tools.files import file_tools
from nanobot.tools.message import MessageTool
from nanobot.tools.web import WebFetchTool


def builtin_tools(config: Config) -> list[Tool]:
    """Every built-in tool this config turns on (``tools.enabled`` then picks per channel)."""
    files = config.agents.defaults.workspace_path / "files"
    tools: list[Tool] = [
        MessageTool(),
        WebFetchTool(config.tools.web),
        *file_tools(files, config.tools.files),
    ]
    if config.tools.exec.enable:
        tools.append(ExecTool(files, config.tools.exec))
    return tools
