"""The ``tools`` section of the config: which tools are offered, each one's bounds, MCP servers."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanobot.config_loader import SECRET as _SECRET


@dataclass(frozen=True, slots=True)
class WebToolConfig:
    """``web_fetch``: what it may reach and how much it reads."""

    timeout: float = 20.0  # seconds for a whole fetch, redirects included
    max_bytes: int = 2 * 1024 * 1024  # of a response body; past it the rest is not read
    max_chars: int = 20_000  # text given to the model unless the call asks for less
    # Private, loopback, link-local and metadata addresses are refused (checked after DNS, on
    # every redirect): the server usually sits next to things the internet must not reach.
    allow_private: bool = False
    allowed_hosts: list[str] = field(default_factory=list)  # "host" or "host:port", allowed even if private


@dataclass(frozen=True, slots=True)
class FilesToolConfig:
    """``read_file``/``write_file``/``edit_file``/``list_dir``, confined to ``<workspace>/files``."""

    max_read_bytes: int = 1024 * 1024
    max_write_bytes: int = 1024 * 1024
    max_entries: int = 1000  # names one list_dir shows


@dataclass(frozen=True, slots=True)
class ExecToolConfig:
    """``exec``: a shell command in ``<workspace>/files``. Off unless enabled: whoever can reach
    the API (or the bot's chats) could otherwise run commands as this server's user."""

    enable: bool = False
    timeout: float = 60.0
    max_output_chars: int = 20_000


@dataclass(frozen=True, slots=True)
class ToolChannelConfig:
    """Per-channel tool choice: replaces ``tools.enabled`` for that channel."""

    enabled: list[str] = field(default_factory=lambda: ["*"])


@dataclass(frozen=True, slots=True)
class McpServerConfig:
    """One MCP server: ``command`` (+ ``args``, ``env``, ``cwd``) runs it over stdio; ``url``
    (+ ``headers``) reaches it over Streamable HTTP. Its tools are offered as ``mcp_<server>_<tool>``."""

    type: str = ""  # "stdio" or "streamableHttp"; empty: from whether command or url is given
    command: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False, metadata=_SECRET)  # often holds tokens
    cwd: str = ""
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict, repr=False, metadata=_SECRET)
    tool_timeout: float = 30.0  # seconds one call may take; past it the model gets an error text
    enabled_tools: list[str] = field(default_factory=lambda: ["*"])  # raw or mcp_ names; "*": all

    @property
    def is_stdio(self) -> bool:
        """Whether this server runs as a child process (else it is reached over HTTP)."""
        return bool(self.command)


@dataclass(frozen=True, slots=True)
class ToolsConfig:
    """The agent's tools: which are offered (names or ``fnmatch`` patterns), and each one's bounds."""

    enabled: list[str] = field(default_factory=lambda: ["*"])
    channels: dict[str, ToolChannelConfig] = field(default_factory=dict)
    max_result_chars: int = 50_000  # of one tool result, before the model sees it
    web: WebToolConfig = field(default_factory=WebToolConfig)
    files: FilesToolConfig = field(default_factory=FilesToolConfig)
    exec: ExecToolConfig = field(default_factory=ExecToolConfig)
    mcp_servers: dict[str, McpServerConfig] = field(default_factory=dict)
