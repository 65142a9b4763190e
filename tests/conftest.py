"""Shared fixtures: the fake LLM, a real gateway pointed at it, and the official openai client."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).parent))

from nanobot.config import Config, parse_config
from nanobot.runtime import build_app

from fake_llm import FakeLLM

MODEL = "test-model"

# tests/pg.py: the throwaway PostgreSQL server (pg_server) and a fresh database per test (pg_url).
pytest_plugins = ["pg"]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base``."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
async def fake_llm(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeLLM:
    """A scripted OpenAI-compatible upstream on loopback."""
    llm = FakeLLM()
    server = await aiohttp_server(llm.app())
    llm.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return llm


@pytest.fixture
def make_config(fake_llm: FakeLLM, tmp_path: Path) -> Callable[..., Config]:
    """Build a config whose provider is the fake LLM and whose workspace is temporary."""

    def build(extra: dict[str, Any] | None = None) -> Config:
        base = {
            "agents": {"defaults": {"model": MODEL, "provider": "fake", "workspace": str(tmp_path / "ws")}},
            "providers": {
                "fake": {"apiBase": fake_llm.url, "apiKey": "sk-upstream", "retryBaseSeconds": 0.001}
            },  # type: ignore[attr-defined]
        }
        return parse_config(merge(base, extra or {}))

    return build


@pytest.fixture
def start_gateway(
    aiohttp_server: Callable[..., Awaitable[TestServer]], make_config: Callable[..., Config]
) -> Callable[..., Awaitable[str]]:
    """Start a real gateway (the whole runtime) and return its base URL."""

    async def start(extra: dict[str, Any] | None = None) -> str:
        server = await aiohttp_server(build_app(make_config(extra)))
        return str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
async def gateway(start_gateway: Callable[..., Awaitable[str]]) -> str:
    """A gateway with the default test config."""
    return await start_gateway()


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official openai client pointed at the gateway (no retries, so errors surface)."""
    async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="dummy", max_retries=0) as c:
        yield c


@pytest.fixture
async def telegram_url(fake: Any, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    """Where the module's fake Bot API (its ``fake`` fixture) listens."""
    server = await aiohttp_server(fake.app, access_log=None)
    return str(server.make_url("")).rstrip("/")
