"""Typed, frozen configuration, loaded once from nanobot's ``config.json``.

Keys are camelCase (canonical) or snake_case. ``${ENV_VAR}`` inside string values is
resolved at load (``${ENV_VAR:-default}`` when it may be unset). A bad value raises
:class:`ConfigError` naming the key path (``api.port: expected an integer, got "x"``);
unknown keys become warnings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import orjson

from nanobot.config_loader import SECRET as _SECRET
from nanobot.config_loader import build, describe_value
from nanobot.errors import ConfigError
from nanobot.storage_config import StorageConfig, check_storage
from nanobot.tools_config import McpServerConfig, ToolsConfig
from nanobot.webhook_config import TelegramWebhookConfig, check_telegram_webhook

DEFAULT_CONFIG_PATH = Path("~/.nanobot/config.json")
OPENAI_API_BASE = "https://api.openai.com/v1"
TELEGRAM_API_BASE = "https://api.telegram.org"
DISCORD_API_BASE = "https://discord.com/api/v10"
DISCORD_GATEWAY_URL = "wss://gateway.discord.gg/?v=10&encoding=json"


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The HTTP API: where it binds and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 8900
    timeout: float = 120.0
    api_key: str = field(default="", repr=False, metadata=_SECRET)
    max_request_bytes: int = 64 * 1024 * 1024
    max_file_bytes: int = 10 * 1024 * 1024
    max_files: int = 16
    max_extracted_chars: int = 200_000
    max_pdf_pages: int = 2000
    extract_timeout: float = 30.0
    keep_alive_seconds: float = 15.0
    # -- browser safety (hardening issue, part 1)
    cors_origins: list[str] = field(default_factory=list)  # exact origins a web page may call from
    allowed_hosts: list[str] = field(default_factory=list)  # extra Host names answered (DNS rebinding)
    # -- resource bounds (part 2)
    max_concurrent_turns: int = 1024  # API turns running at once; past it: 429 + Retry-After
    header_timeout: float = 5.0  # seconds a connection may take to send a complete request head
    idle_timeout: float = 60.0  # seconds an idle keep-alive connection stays open
    stream_stall_timeout: float = 30.0  # seconds an SSE reader may read nothing before it is cut
    # -- clean failures (part 3)
    shutdown_grace: float = 10.0  # seconds running requests get to finish on SIGTERM
    # -- chat UIs (issue 11): "reject" one-user-message rule, or "accept" a resent conversation
    client_history: str = "reject"
    web_chat: bool = True  # serve the built-in chat page at GET /
    # -- operations (scale-out issue): GET /metrics, and one log line per request (opt-in: it costs)
    metrics: bool = True
    access_log: bool = False
    # -- several processes (scale-out issue): `nanobot serve` starts this many on one port
    # (SO_REUSEPORT, a supervisor restarts any that dies); more than 1 needs storage.url = postgresql
    workers: int = 1


@dataclass(frozen=True, slots=True)
class AgentDefaults:
    """How the agent talks to its model."""

    model: str = "gpt-4o-mini"
    provider: str = ""
    workspace: str = "~/.nanobot/workspace"
    max_tokens: int = 8192
    temperature: float = 0.7
    max_tool_iterations: int = 20
    system_prompt: str = (
        "You are nanobot, a helpful assistant. Answer concisely. "
        "Use the `message` tool to send a message to a chat on another channel."
    )
    max_history_messages: int = 100
    max_history_chars: int = 400_000  # ~100k tokens: old turns with big documents drop out first
    session_cache_bytes: int = 64 * 1024 * 1024  # in-memory history cache, bounded by size

    @property
    def workspace_path(self) -> Path:
        """The workspace folder, with ``~`` expanded."""
        return Path(self.workspace).expanduser()


@dataclass(frozen=True, slots=True)
class AgentsConfig:
    """Agent settings; ``defaults`` apply to every agent."""

    defaults: AgentDefaults = field(default_factory=AgentDefaults)


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One OpenAI-compatible chat-completions endpoint."""

    api_key: str = field(default="", repr=False, metadata=_SECRET)
    api_base: str = ""
    extra_headers: dict[str, str] = field(default_factory=dict, repr=False, metadata=_SECRET)
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    max_retries: int = 3
    retry_base_seconds: float = 0.5
    max_response_bytes: int = 32 * 1024 * 1024  # one completion, or one SSE line; past it: 502


@dataclass(frozen=True, slots=True)
class TelegramConfig:
    """The Telegram Bot API channel."""

    enabled: bool = False
    token: str = field(default="", repr=False, metadata=_SECRET)
    allow_from: list[str] = field(default_factory=list)
    api_base: str = TELEGRAM_API_BASE
    poll_timeout: int = 30
    webhook: TelegramWebhookConfig = field(default_factory=TelegramWebhookConfig)


@dataclass(frozen=True, slots=True)
class DiscordConfig:
    """The Discord channel: REST for sending, the Gateway websocket for receiving."""

    enabled: bool = False
    token: str = field(default="", repr=False, metadata=_SECRET)
    allow_from: list[str] = field(default_factory=list)
    api_base: str = DISCORD_API_BASE
    gateway_url: str = DISCORD_GATEWAY_URL
    intents: int = 37377  # GUILDS | GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT


@dataclass(frozen=True, slots=True)
class ChannelsConfig:
    """Chat channels and the durable outbox that feeds them."""

    telegram: TelegramConfig = field(default_factory=TelegramConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    max_attempts: int = 8
    held_max_age_seconds: float = 86400.0
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0

    @property
    def webhook_routes(self) -> frozenset[str]:
        """Paths where a platform calls in with its own secret (a Host the API does not know)."""
        webhook = self.telegram.webhook
        return frozenset({webhook.route}) if self.telegram.enabled and webhook.enabled else frozenset()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole nanobot configuration."""

    api: ApiConfig = field(default_factory=ApiConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    channels: ChannelsConfig = field(default_factory=ChannelsConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    warnings: tuple[str, ...] = field(default=(), compare=False, metadata={"internal": True})

    @property
    def model(self) -> str:
        """The one model this gateway serves."""
        return self.agents.defaults.model

    def provider(self) -> tuple[str, ProviderConfig]:
        """The provider the agent uses, with its API base filled in.

        ``agents.defaults.provider`` picks one by name (a known name needs no entry in
        ``providers``); otherwise the first entry with a key or a base, or a local one
        (ollama, vllm, ...); with none, OpenAI.
        """
        wanted = self.agents.defaults.provider
        if wanted:
            found = self.providers.get(wanted)
            if found is None:
                if wanted not in PROVIDER_BASES:
                    raise ConfigError(
                        f"agents.defaults.provider: no provider named {wanted!r} in providers "
                        f"(known without an entry: {', '.join(PROVIDER_BASES)})"
                    )
                found = ProviderConfig()
            return wanted, _with_default_base(wanted, found)
        for name, cfg in self.providers.items():
            if cfg.api_key or cfg.api_base or name in LOCAL_PROVIDERS:
                return name, _with_default_base(name, cfg)
        return "openai", ProviderConfig(api_base=OPENAI_API_BASE)


# The usual OpenAI-compatible base of each provider name that needs no ``apiBase``.
PROVIDER_BASES: dict[str, str] = {
    "openai": OPENAI_API_BASE,
    "openrouter": "https://openrouter.ai/api/v1",
    "anthropic": "https://api.anthropic.com/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
    "groq": "https://api.groq.com/openai/v1",
    "mistral": "https://api.mistral.ai/v1",
    "together": "https://api.together.xyz/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "xai": "https://api.x.ai/v1",
    "moonshot": "https://api.moonshot.ai/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "vllm": "http://127.0.0.1:8000/v1",
    "lmstudio": "http://127.0.0.1:1234/v1",
    "llamacpp": "http://127.0.0.1:8080/v1",
}
# Servers people run themselves: they usually need no key.
LOCAL_PROVIDERS = frozenset({"ollama", "vllm", "lmstudio", "llamacpp"})


def _with_default_base(name: str, cfg: ProviderConfig) -> ProviderConfig:
    if cfg.api_base:
        if not cfg.api_base.startswith(("http://", "https://")):
            raise ConfigError(f"providers.{name}.apiBase: expected a URL starting with http:// or https://")
        if cfg.api_key and "@" in cfg.api_base.split("/", 3)[2]:
            # aiohttp refuses both; and a key belongs in apiKey, where it is kept out of logs.
            raise ConfigError(f"providers.{name}.apiBase: user info in the URL and an apiKey; give only one")
        return cfg
    base = PROVIDER_BASES.get(name)
    if base is None:
        raise ConfigError(
            f"providers.{name}.apiBase: required ({name!r} is not a provider nanobot knows the address of; "
            f"known: {', '.join(PROVIDER_BASES)})"
        )
    return dataclasses.replace(cfg, api_base=base)


def safe_url(url: str) -> str:
    """``url`` as ``scheme://host[:port]/path``: no user info, query or fragment (they may hold keys)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(an invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path


class ProviderSummary(NamedTuple):
    """What start-up says about the provider: nothing secret."""

    name: str
    api_base: str  # without user info, query or fragment
    key_missing: bool  # no key (nor extra headers) for a provider that is not local


def describe_provider(config: Config) -> ProviderSummary:
    """The provider's name, its API base without secrets, and whether it lacks a key it likely needs."""
    name, cfg = config.provider()
    base = safe_url(cfg.api_base)
    local = name in LOCAL_PROVIDERS or _is_loopback(cfg.api_base)
    return ProviderSummary(name, base, not (cfg.api_key or cfg.extra_headers or local))


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name, an address, or ``[an IPv6 address]``) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_loopback(url: str) -> bool:
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    return is_loopback_host(host)


def _check(config: Config) -> None:
    api = config.api
    if not 0 < api.port < 65536:
        raise ConfigError(f"api.port: expected 1-65535, got {api.port}")
    if api.timeout <= 0:
        raise ConfigError("api.timeout: must be greater than 0")
    for key, bound in (
        ("maxConcurrentTurns", api.max_concurrent_turns),
        ("headerTimeout", api.header_timeout),
        ("idleTimeout", api.idle_timeout),
        ("streamStallTimeout", api.stream_stall_timeout),
    ):
        if bound <= 0:
            raise ConfigError(f"api.{key}: must be greater than 0")
    if api.shutdown_grace < 0:
        raise ConfigError("api.shutdownGrace: must not be negative")
    if not 1 <= api.workers <= 256:
        raise ConfigError(f"api.workers: expected 1-256, got {api.workers}")
    if api.client_history not in ("reject", "accept"):
        raise ConfigError(f'api.clientHistory: expected "reject" or "accept", got {api.client_history!r}')
    check_storage(config.storage)
    check_telegram_webhook(config.channels.telegram.webhook)
    if not config.agents.defaults.model:
        raise ConfigError("agents.defaults.model: must not be empty")
    if config.agents.defaults.max_tool_iterations < 1:
        raise ConfigError("agents.defaults.maxToolIterations: must be at least 1")
    tools = config.tools
    for key, bound in (
        ("maxResultChars", tools.max_result_chars),
        ("web.timeout", tools.web.timeout),
        ("web.maxBytes", tools.web.max_bytes),
        ("exec.timeout", tools.exec.timeout),
    ):
        if bound <= 0:
            raise ConfigError(f"tools.{key}: must be greater than 0")
    for name, server in tools.mcp_servers.items():
        _check_mcp_server(name, server)
    config.provider()  # validates the provider choice


_MCP_TYPES = {"": "", "stdio": "stdio", "streamableHttp": "http", "streamable_http": "http", "http": "http"}


def _check_mcp_server(name: str, server: McpServerConfig) -> None:
    where = f"tools.mcpServers.{name}"
    if not name.strip():
        raise ConfigError("tools.mcpServers: a server name must not be empty")
    kind = _MCP_TYPES.get(server.type)
    if kind is None:
        hint = " (the old SSE transport is not supported)" if server.type.lower() == "sse" else ""
        raise ConfigError(f"{where}.type: expected stdio or streamableHttp, got {server.type!r}{hint}")
    if bool(server.command) == bool(server.url):
        raise ConfigError(f"{where}: give either command (a stdio server) or url (an HTTP server)")
    if kind and (kind == "stdio") != server.is_stdio:
        raise ConfigError(f"{where}: type {server.type} needs {'command' if kind == 'stdio' else 'url'}")
    if server.url and not server.url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: expected a URL starting with http:// or https://")
    if server.tool_timeout <= 0:
        raise ConfigError(f"{where}.toolTimeout: must be greater than 0")


def parse_config(data: object) -> Config:
    """Build a :class:`Config` from parsed JSON, raising :class:`ConfigError` on bad values."""
    if not isinstance(data, dict):
        got = describe_value(data, False)
        raise ConfigError(f"config: expected a JSON object at the top level, got {got}")
    warnings: list[str] = []
    config: Config = build(Config, data, "", warnings)
    config = dataclasses.replace(config, warnings=tuple(warnings))
    _check(config)
    return config


def load_config(path: str | Path | None = None) -> Config:
    """Load ``path``, else ``~/.nanobot/config.json`` if it exists, else the built-in defaults."""
    if path is None:
        default = DEFAULT_CONFIG_PATH.expanduser()
        if not default.exists():
            return parse_config({})
        path = default
    file = Path(path).expanduser()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file ({exc.strerror})") from None
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    return parse_config(data)


def with_overrides(config: Config, *, storage_url: str | None = None, **api_overrides: object) -> Config:
    """Return ``config`` with CLI flags applied: ``host``, ``port``, ``timeout``, ``workers`` over
    ``api``, ``storage_url`` over ``storage.url``."""
    given = {k: v for k, v in api_overrides.items() if v is not None}
    if not given and storage_url is None:
        return config
    new = dataclasses.replace(config, api=dataclasses.replace(config.api, **given))  # type: ignore[arg-type]
    if storage_url is not None:
        new = dataclasses.replace(new, storage=dataclasses.replace(new.storage, url=storage_url))
    _check(new)
    return new
