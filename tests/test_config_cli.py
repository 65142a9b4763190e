"""Config loading and the `nanobot` command: clear one-line errors, exit codes, a real `serve`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from nanobot.config import load_config, parse_config
from nanobot.errors import ConfigError

from fake_llm import FakeLLM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_defaults() -> None:
    """With no file, the gateway binds 127.0.0.1:8900 with a 120 s timeout."""
    config = parse_config({})
    assert (config.api.host, config.api.port, config.api.timeout) == ("127.0.0.1", 8900, 120.0)
    assert config.agents.defaults.workspace_path == Path("~/.nanobot/workspace").expanduser()


def test_camel_and_snake_case_are_both_accepted() -> None:
    """maxTokens and max_tokens mean the same key."""
    a = parse_config({"agents": {"defaults": {"maxTokens": 5}}})
    b = parse_config({"agents": {"defaults": {"max_tokens": 5}}})
    assert a.agents.defaults.max_tokens == b.agents.defaults.max_tokens == 5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"api": {"port": "x"}}, 'api.port: expected an integer, got "x"'),
        ({"api": {"port": 70000}}, "api.port: expected 1-65535, got 70000"),
        ({"api": {"timeout": "soon"}}, 'api.timeout: expected a number, got "soon"'),
        ({"api": []}, "api: expected an object, got a list"),
        ({"channels": {"telegram": {"enabled": "yes"}}}, "channels.telegram.enabled: expected true or false"),
        (
            {"agents": {"defaults": {"provider": "nope"}}},
            "agents.defaults.provider: no provider named 'nope'",
        ),
        ({"providers": {"local": {"apiKey": "k"}}}, "providers.local.apiBase: required"),
    ],
)
def test_bad_values_name_the_key_path(data: dict[str, object], message: str) -> None:
    """Every bad value is one message that starts with its key path."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.message.startswith(message)


def test_secrets_are_never_echoed_in_errors_or_reprs() -> None:
    """A mistyped apiKey is described by type, never by value; reprs hide keys and tokens."""
    with pytest.raises(ConfigError) as info:
        parse_config({"api": {"apiKey": 12345678}})
    assert "12345678" not in info.value.message
    config = parse_config(
        {
            "api": {"apiKey": "sk-api-secret"},
            "providers": {
                "openai": {"apiKey": "sk-provider-secret", "extraHeaders": {"X-Key": "hdr-secret"}}
            },
            "channels": {"telegram": {"token": "123:tg-secret"}, "discord": {"token": "dc-secret"}},
        }
    )
    text = repr(config)
    for secret in ("sk-api-secret", "sk-provider-secret", "hdr-secret", "tg-secret", "dc-secret"):
        assert secret not in text


def test_env_vars_are_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """${VAR} in a string value is replaced at load; a missing variable is an error naming the key."""
    monkeypatch.setenv("NB_TEST_KEY", "from-env")
    config = parse_config({"providers": {"openai": {"apiKey": "${NB_TEST_KEY}"}}})
    assert config.providers["openai"].api_key == "from-env"
    monkeypatch.delenv("NB_TEST_KEY")
    with pytest.raises(ConfigError, match=r"providers.openai.apiKey: environment variable NB_TEST_KEY"):
        parse_config({"providers": {"openai": {"apiKey": "${NB_TEST_KEY}"}}})


def test_unknown_keys_warn(tmp_path: Path) -> None:
    """Unknown keys load fine and are listed as warnings."""
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps({"api": {"prot": 1}, "extra": True}))
    assert load_config(path).warnings == ("api.prot: unknown key, ignored", "extra: unknown key, ignored")


def test_provider_choice() -> None:
    """agents.defaults.provider picks one; otherwise the first configured; openai defaults its apiBase."""
    config = parse_config({"providers": {"a": {}, "b": {"apiBase": "http://b"}, "openai": {"apiKey": "k"}}})
    assert config.provider()[0] == "b"
    chosen = parse_config(
        {"agents": {"defaults": {"provider": "openai"}}, "providers": {"openai": {"apiKey": "k"}}}
    )
    assert chosen.provider()[1].api_base == "https://api.openai.com/v1"


def run_cli(*args: str, timeout: float = 20) -> tuple[int, str]:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "nanobot", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"api": {"port": "x"}}', 'nanobot: api.port: expected an integer, got "x"'),
        (b"{not json", "not valid JSON"),
        (
            b'{"api": {"host": "0.0.0.0"}}',
            "nanobot: api.host: refusing to listen on 0.0.0.0 without api.apiKey",
        ),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    """A bad config is one line on stderr and exit code 2, never a traceback."""
    path = tmp_path / "config.json"
    path.write_bytes(content)
    code, err = run_cli("serve", "-c", str(path))
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_missing_config_file(tmp_path: Path) -> None:
    """A -c path that does not exist is exit 2 with its name."""
    code, err = run_cli("serve", "-c", str(tmp_path / "nope.json"))
    assert code == 2 and "config file not found" in err


async def test_cli_serve_answers_and_stops_cleanly(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """`nanobot serve -c config.json --port N` serves a chat completion, then exits 0 on SIGTERM."""
    port = free_port()
    path = tmp_path / "config.json"
    path.write_bytes(
        orjson.dumps(
            {
                "agents": {"defaults": {"model": "m", "provider": "fake", "workspace": str(tmp_path / "ws")}},
                "providers": {"fake": {"apiBase": fake_llm.url}},  # type: ignore[attr-defined]
            }
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nanobot",
        "serve",
        "-c",
        str(path),
        "--port",
        str(port),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 15
            while True:
                try:
                    async with s.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)  # polling a starting process with a deadline
            body = {"messages": [{"role": "user", "content": "hi"}]}
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                assert (await r.json())["choices"][0]["message"]["content"] == "echo: hi"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_port_in_use_is_one_line(tmp_path: Path) -> None:
    """A port already taken is exit 1 with one line naming host and port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "config.json"
        path.write_bytes(orjson.dumps({"agents": {"defaults": {"workspace": str(tmp_path / "ws")}}}))
        code, err = run_cli("serve", "-c", str(path), "--port", str(port))
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_env_var_default_applies_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """${VAR:-default} falls back to the default when VAR is unset."""
    monkeypatch.delenv("NB_UNSET_VAR", raising=False)
    config = parse_config({"providers": {"openai": {"apiKey": "${NB_UNSET_VAR:-fallback}"}}})
    assert config.providers["openai"].api_key == "fallback"


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented config.example.json loads with no environment variables set."""
    for var in ("OPENAI_API_KEY", "TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    config = load_config(Path(__file__).parent.parent / "config.example.json")
    assert config.api.port == 8900 and config.warnings == ()


def run_cli_out(*args: str) -> tuple[int, str, str]:
    """Run `nanobot ARGS`; exit code, stdout, stderr."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "nanobot", *args], capture_output=True, text=True, timeout=20, check=False
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_outbox_options_after_the_subcommand(tmp_path: Path) -> None:
    """`nanobot outbox list -c cfg` reads that config's outbox (the -c used to be swallowed as an action)."""
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps({"agents": {"defaults": {"workspace": str(tmp_path / "ws")}}}))
    for argv in (["outbox", "list", "-c", str(path)], ["outbox", "-c", str(path), "list", "--all"],
                 ["outbox", "list", "--all", "--config", str(path)]):  # fmt: skip
        assert run_cli_out(*argv)[:2] == (0, "the outbox is empty\n"), argv
    code, out, _ = run_cli_out("outbox", "retry", "7", "-c", str(path))
    assert (code, out) == (1, "no outbox message 7\n")
    code, _, err = run_cli_out("outbox", "drop", "x", "-c", str(path))
    assert code == 2 and "invalid int value" in err


def test_cli_serve_help_has_a_description_and_short_options() -> None:
    """`nanobot serve --help` says what serve does and offers -H, -p and -t."""
    code, out, _ = run_cli_out("serve", "--help")
    assert code == 0
    assert "OpenAI-compatible HTTP API" in out
    for short, long in (("-H", "--host"), ("-p", "--port"), ("-t", "--timeout"), ("-c", "--config")):
        assert f"{short} {long.upper()[2:]}, {long} {long.upper()[2:]}" in out, out


def test_cli_outbox_on_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """`nanobot outbox list` on a garbage outbox.db is one line naming it and exit 2, not a traceback."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "outbox.db").write_text("garbage\n" * 100)
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps({"agents": {"defaults": {"workspace": str(tmp_path / "ws")}}}))
    code, _, err = run_cli_out("outbox", "list", "-c", str(path))
    assert code == 2
    outbox = tmp_path / "ws" / "outbox.db"
    assert err.strip() == f"nanobot: cannot use the outbox {outbox}: file is not a database"
