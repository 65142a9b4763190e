"""Provider names: known ones get their usual API base, unknown ones must say where they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from nanobot.config import describe_provider, parse_config
from nanobot.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("openai", "https://api.openai.com/v1"),
        ("openrouter", "https://openrouter.ai/api/v1"),
        ("deepseek", "https://api.deepseek.com/v1"),
        ("groq", "https://api.groq.com/openai/v1"),
        ("mistral", "https://api.mistral.ai/v1"),
        ("ollama", "http://127.0.0.1:11434/v1"),
        ("vllm", "http://127.0.0.1:8000/v1"),
        ("lmstudio", "http://127.0.0.1:1234/v1"),
        ("llamacpp", "http://127.0.0.1:8080/v1"),
    ],
)
def test_a_known_provider_gets_its_usual_base(name: str, base: str) -> None:
    """providers.<known name> without apiBase calls that provider's usual address."""
    config = parse_config({"agents": {"defaults": {"provider": name}}, "providers": {name: {"apiKey": "k"}}})
    assert config.provider() == (name, config.providers[name].__class__(api_key="k", api_base=base))


def test_a_local_provider_needs_no_key_nor_entry() -> None:
    """`"ollama": {}` is chosen as is (not skipped for OpenAI), and naming it needs no entry at all."""
    config = parse_config({"providers": {"ollama": {}}})
    assert describe_provider(config) == ("ollama", "http://127.0.0.1:11434/v1", False)
    named = parse_config({"agents": {"defaults": {"provider": "vllm"}}})
    assert describe_provider(named) == ("vllm", "http://127.0.0.1:8000/v1", False)


@pytest.mark.parametrize(
    "data",
    [
        {"agents": {"defaults": {"provider": "mycloud"}}, "providers": {"mycloud": {"apiKey": "k"}}},
        {"providers": {"mycloud": {"apiKey": "k"}}},
    ],
    ids=["named", "first-configured"],
)
def test_an_unknown_provider_without_base_is_a_config_error(data: dict[str, object]) -> None:
    """No silent fall-back to OpenAI: the error names providers.mycloud.apiBase."""
    with pytest.raises(ConfigError, match=r"^providers\.mycloud\.apiBase: required"):
        parse_config(data)


def test_an_api_base_must_be_a_url() -> None:
    """`localhost:11434` (no scheme) is refused at load, naming the key."""
    with pytest.raises(ConfigError, match=r"^providers\.ollama\.apiBase: expected a URL"):
        parse_config({"providers": {"ollama": {"apiBase": "localhost:11434/v1"}}})


def test_describe_provider_shows_no_secrets() -> None:
    """Start-up's summary has the base without user info or query, and flags a missing key."""
    config = parse_config(
        {"providers": {"corp": {"apiBase": "https://u:pw-secret@llm.corp.example:8443/v1?key=q-secret"}}}
    )
    summary = describe_provider(config)
    assert summary == ("corp", "https://llm.corp.example:8443/v1", True)
    assert summary.name == "corp" and summary.key_missing
    keyed = parse_config({"providers": {"openrouter": {"apiKey": "sk-or-secret"}}})
    assert describe_provider(keyed) == ("openrouter", "https://openrouter.ai/api/v1", False)
    assert "sk-or-secret" not in repr(describe_provider(keyed))


def test_serve_exits_2_naming_an_unknown_provider(tmp_path: Path) -> None:
    """`nanobot serve` with an unknown provider and no apiBase exits 2 with one line naming the key."""
    cfg = tmp_path / "config.json"
    cfg.write_bytes(
        orjson.dumps(
            {
                "agents": {"defaults": {"provider": "mycloud", "workspace": str(tmp_path / "ws")}},
                "providers": {"mycloud": {"apiKey": "sk-secret"}},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "nanobot", "serve", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "providers.mycloud.apiBase" in proc.stderr and "sk-secret" not in proc.stderr
    assert "Traceback" not in proc.stderr
