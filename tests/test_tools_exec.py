"""exec: off by default; when enabled, a bounded shell command in the files folder."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tool_calls import call_on

from fake_llm import FakeLLM

Gateway = Callable[..., Awaitable[str]]
ON = {"tools": {"exec": {"enable": True}}}


def alive(pid: int) -> bool:
    """Whether a process with this pid still runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def exited(pid: int, within: float = 10.0) -> None:
    """Wait (up to ``within`` seconds) until the process ``pid`` has exited, through a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, within)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_exec_is_off_by_default(start_gateway: Gateway, fake_llm: FakeLLM, tmp_path: Path) -> None:
    """Without tools.exec.enable the model is not offered exec, and a call to it runs nothing."""
    url = await start_gateway()
    marker = tmp_path / "ran"
    text = await call_on(url, fake_llm, "exec", {"command": f"touch {marker}"})
    assert text == "Error: unknown tool 'exec'"
    assert "exec" not in [t["function"]["name"] for t in fake_llm.requests[0]["tools"]]
    assert not marker.exists()


async def test_exec_runs_in_the_files_folder(
    start_gateway: Gateway, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """Enabled, a command runs in <workspace>/files; its output and exit code reach the model."""
    url = await start_gateway(ON)
    text = await call_on(url, fake_llm, "exec", {"command": "pwd; echo oops >&2; exit 3"})
    assert text == f"exit code: 3\n{tmp_path / 'ws' / 'files'}\noops\n"
    assert "exec" in [t["function"]["name"] for t in fake_llm.requests[0]["tools"]]


async def test_exec_does_not_pass_the_servers_secrets(
    start_gateway: Gateway, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's environment is minimal: a provider key in the server's environment is not in it."""
    monkeypatch.setenv("NANOBOT_TEST_SECRET", "sk-in-env")
    url = await start_gateway(ON)
    text = await call_on(url, fake_llm, "exec", {"command": "env"})
    assert text.startswith("exit code: 0\n") and "PATH=" in text
    assert "sk-in-env" not in text


async def test_exec_timeout_kills_the_process_group(start_gateway: Gateway, fake_llm: FakeLLM) -> None:
    """A command past tools.exec.timeout is killed with everything it started; the model is told."""
    url = await start_gateway({"tools": {"exec": {"enable": True, "timeout": 1}}})
    command = "sleep 300 & echo $!; sleep 300"
    text = await call_on(url, fake_llm, "exec", {"command": command})
    assert text.startswith("Error: the command timed out after 1 s and was killed (tools.exec.timeout)\n")
    child = int(text.splitlines()[1])
    assert not alive(child)


async def test_exec_output_is_bounded(start_gateway: Gateway, fake_llm: FakeLLM) -> None:
    """A command that prints a lot is cut at tools.exec.maxOutputChars (and still finishes)."""
    url = await start_gateway({"tools": {"exec": {"enable": True, "maxOutputChars": 100}}})
    text = await call_on(url, fake_llm, "exec", {"command": "yes | head -c 1000000"})
    assert text.startswith("exit code: 0\ny\ny\n")
    assert text.endswith("\n[output truncated: 1,000,000 characters in all (tools.exec.maxOutputChars)]")
    assert len(text) < 250


async def test_background_jobs_do_not_outlive_the_command(start_gateway: Gateway, fake_llm: FakeLLM) -> None:
    """What a command leaves running in the background is killed when it exits (no orphans)."""
    url = await start_gateway(ON)
    text = await call_on(url, fake_llm, "exec", {"command": "sleep 300 >/dev/null 2>&1 & echo $!"})
    assert text.startswith("exit code: 0\n")
    pid = int(text.splitlines()[1])
    # SIGKILL is sent before the answer; on a loaded machine the kernel may take a moment to act on it
    await exited(pid)
    assert not alive(pid)


async def test_a_process_that_leaves_the_group_does_not_hang_the_turn(
    start_gateway: Gateway, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """A command whose child starts its own session (setsid) and keeps the output pipe open still
    answers once the command ends; the model is told the output was cut."""
    url = await start_gateway({"tools": {"exec": {"enable": True, "timeout": 1}}})
    pid_file = tmp_path / "daemon.pid"
    # (the command itself waits until the daemon has left its group, so the race is not the test's)
    daemon = f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 30' &"
    command = f"{daemon} until [ -s {pid_file} ]; do :; done; echo hi"
    text = await call_on(url, fake_llm, "exec", {"command": command})
    assert "output cut: a process the command started outside its group still holds it" in text, text
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # (ours to clean up: it left the group on purpose)
