"""``exec``: one shell command in the workspace files folder, time- and output-bounded.

Off unless ``tools.exec.enable``: whoever can reach the API (or write to the bot) could run
commands as this server's user. The command gets its own process group, which is killed
whole when it times out, when the turn is cancelled, and when the shell exits (so nothing it
started in the background outlives the call). Its environment is minimal: the server's own
(provider keys among it) is not passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from nanobot.tools.base import Tool, ToolContext, ToolResult
from nanobot.tools_config import ExecToolConfig

_ENV_KEPT = ("PATH", "LANG", "LC_ALL", "TZ")
_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"command": {"type": "string", "description": "A /bin/sh command line."}},
    "required": ["command"],
}


class ExecTool(Tool):
    """Run ``/bin/sh -c <command>`` in the files folder; the result is the exit code and the output."""

    name = "exec"
    description = (
        "Run a shell command (/bin/sh -c) in the workspace files folder and return its exit code and "
        "output (stdout and stderr together). Long-running commands are killed."
    )
    parameters = _PARAMETERS

    def __init__(self, root: Path, config: ExecToolConfig) -> None:
        self._root = root
        self._config = config

    def summarize(self, args: dict[str, Any]) -> str:
        """The command."""
        return str(args.get("command", ""))

    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult | str:
        """Run the command; a timeout kills its whole process group."""
        command = args.get("command")
        if not isinstance(command, str) or not command.strip():
            return ToolResult("Error: command must be a non-empty string", is_error=True)
        await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)
        env = {k: os.environ[k] for k in _ENV_KEPT if k in os.environ}
        env.update(HOME=str(self._root), TERM="dumb")
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            cwd=self._root,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed whole
        )
        assert proc.stdout is not None
        output = asyncio.create_task(_read_bounded(proc.stdout, self._config.max_output_chars))
        timed_out = False
        code = -1
        try:
            async with asyncio.timeout(self._config.timeout):
                code = await proc.wait()
        except TimeoutError:
            timed_out = True
        except BaseException:  # cancelled: the turn is gone; so is everything the command started
            output.cancel()
            raise
        finally:
            _kill_group(proc.pid)  # also what the shell left running in the background
            if proc.returncode is None:
                await asyncio.shield(proc.wait())
        try:  # a process that left the group (setsid, a daemon) may hold the pipe open forever
            text, total = await asyncio.wait_for(output, _DRAIN_SECONDS)
        except TimeoutError:
            _close_pipes(proc)
            text, total = "[output cut: a process the command started outside its group still holds it]", 0
        if total > len(text):
            text += f"\n[output truncated: {total:,} characters in all (tools.exec.maxOutputChars)]"
        if timed_out:
            return ToolResult(
                f"Error: the command timed out after {self._config.timeout:g} s and was killed "
                f"(tools.exec.timeout)\n{text}",
                is_error=True,
            )
        return ToolResult(f"exit code: {code}\n{text}", is_error=code != 0)


_DRAIN_SECONDS = 1.0  # after the command ended, how long its output may take to close


def _close_pipes(proc: asyncio.subprocess.Process) -> None:
    """Let go of the command's pipes (asyncio offers no public way; its transport owns them)."""
    transport: asyncio.BaseTransport | None = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _read_bounded(stream: asyncio.StreamReader, limit: int) -> tuple[str, int]:
    """The first ``limit`` characters of the output, and how many there were; the rest is read and
    dropped, so a chatty command never blocks on a full pipe."""
    kept: list[str] = []
    size = 0
    total = 0
    while chunk := await stream.read(64 * 1024):
        piece = chunk.decode("utf-8", errors="replace")
        total += len(piece)
        if size < limit:
            kept.append(piece[: limit - size])
            size += len(kept[-1])
    return "".join(kept), total
