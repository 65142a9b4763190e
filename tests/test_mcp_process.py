"""MCP servers of a real `nanobot serve` process: start-up in parallel behind /health, and no
server process left behind after a clean stop or after the gateway is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from mcp_support import stdio_server
from served import Served, serve

from fake_llm import FakeLLM

pytestmark = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc to see processes")


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def pids_in(folder: Path, count: int, within: float = 30) -> list[int]:
    """The pids the demo servers wrote into ``folder``, once there are ``count`` (polled)."""
    deadline = asyncio.get_running_loop().time() + within
    while len(found := os.listdir(folder)) < count:
        assert asyncio.get_running_loop().time() < deadline, f"only {found} started"
        await asyncio.sleep(0.05)  # polling files another process writes, with a deadline
    return [int(name) for name in found]


async def all_gone(pids: list[int], within: float = 15) -> bool:
    """Whether every one of ``pids`` has ended within ``within`` seconds (polled)."""
    deadline = asyncio.get_running_loop().time() + within
    while any(alive(p) for p in pids):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)  # polling other processes' exit, with a deadline
    return True


def servers(pid_dir: Path, count: int, *options: str) -> dict[str, Any]:
    """``count`` demo stdio servers that note their pids in ``pid_dir``."""
    return {
        f"s{i}": stdio_server("--name", f"s{i}", "--pid-dir", str(pid_dir), *options) for i in range(count)
    }


async def up_count(served: Served, count: int) -> None:
    """Wait until ``count`` MCP servers have logged that they are up."""
    for i in range(count):
        await served.wait_log(f"MCP server s{i} is up", within=60)


async def test_health_answers_before_five_servers_finish_their_handshake(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    """With five servers still starting (held at a gate), /health answers; all five start at once."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    gates = []
    config = servers(pid_dir, 5)
    for name, server in config.items():
        gate = tmp_path / f"{name}.gate"
        os.mkfifo(gate)
        gates.append(gate)
        server["args"] += ["--gate", str(gate)]
    config["missing"] = {"command": "no-such-mcp-server-command"}
    extra = {"tools": {"mcpServers": config}}
    async with serve(tmp_path, fake_llm.url, {}, extra=extra) as served:  # type: ignore[attr-defined]
        # serve() returned once /health said 200; no server can be up: each waits at its gate.
        pids = await pids_in(pid_dir, 5)  # all five are running at once, each held at its gate
        assert "is up" not in served.log
        line = await served.wait_log("MCP server missing cannot start")
        assert "command not found: no-such-mcp-server-command" in line
        for gate in gates:
            await asyncio.to_thread(lambda g=gate: Path(g).write_text("go"))
        await up_count(served, 5)
        served.terminate()
        assert await served.exit_code() == 0
        assert "Traceback" not in served.log
    assert await all_gone(pids)


async def test_no_server_outlives_a_gateway_killed_with_sigkill(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """kill -9 of `nanobot serve`: its stdio MCP servers end too, even ones that outlive their stdin."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    extra = {"tools": {"mcpServers": servers(pid_dir, 2, "--linger")}}
    async with serve(tmp_path, fake_llm.url, {}, extra=extra) as served:  # type: ignore[attr-defined]
        await up_count(served, 2)
        pids = await pids_in(pid_dir, 2)
        served.proc.send_signal(signal.SIGKILL)
        assert await served.exit_code() == -signal.SIGKILL
    assert await all_gone(pids)


async def test_servers_still_starting_do_not_hold_up_shutdown(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """SIGTERM while servers are still in their handshake: they are stopped at once, nothing is left."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    config = servers(pid_dir, 2)
    for name, server in config.items():
        os.mkfifo(tmp_path / f"{name}.gate")  # never opened for writing: the handshake never ends
        server["args"] += ["--gate", str(tmp_path / f"{name}.gate")]
    extra = {"tools": {"mcpServers": config}}
    async with serve(tmp_path, fake_llm.url, {}, extra=extra) as served:  # type: ignore[attr-defined]
        pids = await pids_in(pid_dir, 2)
        served.terminate()
        assert await served.exit_code() == 0
        assert "did not close" not in served.log and "Traceback" not in served.log
    assert await all_gone(pids)
