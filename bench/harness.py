"""The running benchmark environment: fake upstream, gateway, and how to drive them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.cpus import CpuPlan, plan_cpus
from bench.procs import (
    Children,
    HarnessError,
    free_port,
    http_get,
    read_ready_line,
    run_loadgen,
    wait_healthy,
)
from bench.wrk import wrk_closed


@dataclass(frozen=True, slots=True)
class Settings:
    """Durations and sizes for one run (``--quick`` shrinks them)."""

    quick: bool
    duration: float  # measured seconds per closed-loop point
    warmup: float  # unmeasured seconds before it
    ttfb_n: int
    rate_n: int
    rate_deltas: int
    streams_n: int
    streams_deltas: int
    streams_delay_ms: int
    startup_runs: int
    health_timeout: float
    repeats: int = 3  # each non-stream point, each time on a fresh gateway: min/median/max

    @classmethod
    def make(cls, quick: bool, repeats: int = 3) -> Settings:
        """The quick (smoke) or full settings."""
        if quick:
            return cls(True, 1.0, 0.3, 40, 3, 2000, 1000, 20, 50, 3, 20.0, repeats)
        return cls(False, 5.0, 1.0, 300, 7, 2000, 1000, 20, 50, 5, 20.0, repeats)


def gateway_argv(config: Path) -> list[str]:
    """``nanobot serve -c config``: the console script beside this Python, else the module."""
    script = Path(sys.executable).parent / "nanobot"
    if script.exists():
        return [str(script), "serve", "-c", str(config)]
    return [sys.executable, "-m", "nanobot.cli", "serve", "-c", str(config)]


def gateway_available() -> str:
    """Empty if ``nanobot.cli`` is importable from this Python, else why not."""
    try:
        if importlib.util.find_spec("nanobot.cli") is None:
            return "nanobot.cli not found (gateway not written yet?)"
    except ImportError as exc:
        return f"cannot import nanobot: {exc}"
    return ""


class Bench:
    """Owns the child processes of one run; use as a context manager so they are always killed."""

    def __init__(self, tmp: Path, settings: Settings, pin: bool = True, telegram: bool = False) -> None:
        self.tmp = tmp
        self.settings = settings
        self.cpus: CpuPlan = plan_cpus(pin)
        self.children = Children(tmp)
        self.telegram = telegram
        self.upstream_port = 0
        self.telegram_port = 0
        self.gateway: subprocess.Popen[bytes] | None = None
        self.gateway_port = 0
        self.gateway_error = ""
        self.floor: subprocess.Popen[bytes] | None = None
        self.floor_port = 0
        self.startup_s: float | None = None
        self.client = "python"  # or "wrk": for non-stream distinct-session points (bench.wrk)

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.children.kill_all()

    # ------------------------------------------------------------------ processes

    def start_upstream(self) -> None:
        """Start the fake upstream (and fake Telegram) process and learn its port(s)."""
        argv = [sys.executable, "-m", "bench.upstream"] + (["--telegram"] if self.telegram else [])
        proc = self.children.spawn("upstream", argv, cpus=self.cpus.upstream, stdout_pipe=True)
        ports = read_ready_line(proc, timeout=15)
        self.upstream_port = int(ports[0])
        if self.telegram:
            self.telegram_port = int(ports[1])

    def write_config(self, port: int, telegram: bool = False) -> Path:
        """A gateway config pointing at the fake upstream; returns its path."""
        config: dict[str, Any] = {
            # maxPdfPages: the 9 MiB sample PDF (tests/samples.py) has ~3,650 small pages.
            "api": {"host": "127.0.0.1", "port": port, "maxPdfPages": 10_000},
            "agents": {
                # A workspace per gateway: each starts from nothing (and holds its own lock).
                "defaults": {
                    "model": "bench-model",
                    "provider": "bench",
                    "workspace": str(self.tmp / f"ws-{port}"),
                }
            },
            "providers": {"bench": {"apiBase": f"http://127.0.0.1:{self.upstream_port}/v1", "apiKey": "x"}},
        }
        if telegram and self.telegram_port:
            config["channels"] = {
                "telegram": {
                    "enabled": True,
                    "token": "123:abc",
                    "apiBase": f"http://127.0.0.1:{self.telegram_port}",
                    "allowFrom": ["*"],
                    "pollTimeout": 1,
                }
            }
        path = self.tmp / f"config-{port}.json"
        path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
        return path

    def launch_gateway(
        self, name: str = "gateway", telegram: bool = False
    ) -> tuple[subprocess.Popen[bytes], int, float]:
        """Start one ``nanobot serve`` on a free port; return (process, port, seconds to healthy)."""
        port = free_port()
        config = self.write_config(port, telegram)
        started = time.perf_counter()
        proc = self.children.spawn(name, gateway_argv(config), cpus=self.cpus.server)
        try:
            took = wait_healthy(proc, port, started, self.settings.health_timeout)
        except HarnessError as exc:
            self.children.stop(proc)
            raise HarnessError(f"{exc}\n--- {name} log ---\n{self.children.log_tail(name)}") from None
        return proc, port, took

    def start_gateway(self) -> bool:
        """Start the gateway under test; False (with :attr:`gateway_error`) if it cannot run."""
        self.gateway_error = gateway_available()
        if self.gateway_error:
            return False
        try:
            self.gateway, self.gateway_port, self.startup_s = self.launch_gateway()
        except HarnessError as exc:
            self.gateway_error = str(exc)
            return False
        return True

    def restart_gateway(self) -> None:
        """Replace the gateway under test with a fresh one (new process, empty workspace), so
        every measured point starts from the same state, whatever ran before it."""
        if self.gateway is not None:
            self.children.stop(self.gateway)
            self.gateway = None
        if not self.start_gateway():
            raise HarnessError(f"gateway restart failed: {self.gateway_error.splitlines()[0]}")

    def start_floor(self) -> None:
        """Start the floor proxy (:mod:`bench.floor`) on the server's CPUs, in front of the upstream."""
        api_base = f"http://127.0.0.1:{self.upstream_port}/v1"
        argv = [sys.executable, "-m", "bench.floor", "--upstream", api_base]
        self.floor = self.children.spawn("floor", argv, cpus=self.cpus.server, stdout_pipe=True)
        self.floor_port = int(read_ready_line(self.floor, timeout=15)[0])

    # ------------------------------------------------------------------ driving

    @property
    def direct_url(self) -> str:
        """The fake upstream's chat-completions URL."""
        return f"http://127.0.0.1:{self.upstream_port}/v1/chat/completions"

    @property
    def floor_url(self) -> str:
        """The floor proxy's chat-completions URL."""
        return f"http://127.0.0.1:{self.floor_port}/v1/chat/completions"

    @property
    def gateway_url(self) -> str:
        """The gateway's chat-completions URL."""
        return f"http://127.0.0.1:{self.gateway_port}/v1/chat/completions"

    @property
    def gateway_pid(self) -> int:
        """The gateway's pid (0 when it is not running)."""
        return self.gateway.pid if self.gateway is not None and self.gateway.poll() is None else 0

    def load(self, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Run one load-generator scenario (bounded by ``timeout``, else a generous default)."""
        if (
            self.client == "wrk"
            and spec["kind"] == "closed"
            and spec.get("session", "distinct") == "distinct"
        ):
            return wrk_closed(
                self.children,
                self.tmp,
                spec["url"],
                int(spec["concurrency"]),
                float(spec.get("warmup", 0.5)),
                float(spec["duration"]),
                self.cpus.loadgen,
            )
        if timeout is None:
            timeout = 60 + 2 * float(spec.get("duration", 0)) + float(spec.get("warmup", 0))
        return run_loadgen(self.children, spec, timeout, self.cpus.loadgen)

    def upstream_stats(self) -> dict[str, Any]:
        """The fake upstream's counters."""
        _, body = http_get(self.upstream_port, "/bench/stats")
        stats: dict[str, Any] = orjson.loads(body)
        return stats
