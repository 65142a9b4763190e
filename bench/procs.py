"""Child processes for the harness: start, wait until ready, measure memory, always kill."""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import orjson

ROOT = Path(__file__).resolve().parent.parent


class HarnessError(RuntimeError):
    """A child process failed to start or answer in time."""


class Children:
    """Every process the harness started; :meth:`kill_all` ends them (called from ``finally``)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        cpus: frozenset[int] | set[int] = frozenset(),
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with its output in ``<logdir>/<name>.log`` (stdout piped if asked),
        pinned to ``cpus`` when given (see :mod:`bench.cpus`)."""
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in kill_all
        self._logs.append(log)
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stderr=log,
            stdout=subprocess.PIPE if stdout_pipe else log,
            env=child_env(),
        )
        self.procs.append(proc)
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, cpus)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def kill_all(self) -> None:
        """Stop every child still running and close the log files."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        for log in self._logs:
            log.close()

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last ``lines`` lines of a child's log, for error messages."""
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


PYCACHE = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "nanobot-bench" / "pycache"


def child_env() -> dict[str, str]:
    """The children's environment: ours, the repo root on ``PYTHONPATH`` (for ``bench``), and
    byte-code caching on, redirected to :data:`PYCACHE` (``PYTHONPYCACHEPREFIX``) so nothing is
    written into the source tree: a deployed gateway starts from cached byte code, and
    ``PYTHONDONTWRITEBYTECODE=1`` (set on some dev boxes) would make every start recompile."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(PYCACHE))
    return env


def read_ready_line(proc: subprocess.Popen[bytes], timeout: float) -> list[str]:
    """Wait (bounded) for the child's ``READY ...`` stdout line; return the words after READY."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise HarnessError(f"process {proc.args!r} did not become ready (exit={proc.poll()})")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.2))
        if ready:
            data = os.read(proc.stdout.fileno(), 4096)
            if not data:
                continue
            buf += data
    words = buf.split(b"\n", 1)[0].decode().split()
    if not words or words[0] != "READY":
        raise HarnessError(f"unexpected first line from {proc.args!r}: {buf!r}")
    return words[1:]


def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """A plain blocking GET on 127.0.0.1 (for health polls and stats)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_healthy(proc: subprocess.Popen[bytes], port: int, started: float, timeout: float) -> float:
    """Poll ``GET /health`` every ~2 ms until 200; return seconds since ``started`` (perf_counter)."""
    deadline = started + timeout
    while True:
        if proc.poll() is not None:
            raise HarnessError(f"gateway exited with code {proc.returncode} before /health answered")
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _ = http_get(port, "/health", timeout=0.5)
            if status == 200:
                return time.perf_counter() - started
        if time.perf_counter() > deadline:
            raise HarnessError(f"gateway /health not 200 within {timeout:.0f} s")
        time.sleep(0.002)  # poll interval, bounded by the deadline above


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (small race window; fine on a quiet box)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_hwm(pid: int) -> bool:
    """Reset the peak-RSS mark (``VmHWM``) of ``pid`` to its current RSS; False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (scans ``/proc/*/stat`` for parent pids)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
            parent_of[int(entry)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        kids = [child for child, parent in parent_of.items() if parent == current]
        found.extend(kids)
        frontier.extend(kids)
    return found


def tree_rss_kb(pid: int) -> int:
    """``VmRSS`` of ``pid`` plus all its descendants (e.g. extraction worker processes)."""
    return sum(proc_status_kb(p, "VmRSS") for p in [pid, *descendants(pid)])


class RssSampler:
    """Samples a pid's ``VmRSS`` every ``interval`` s in a thread; keeps the maximum.

    With ``tree=True`` it also tracks the summed RSS of the process and its descendants
    (:attr:`tree_max_kb`), for work done in child processes.
    """

    def __init__(self, pid: int, interval: float = 0.01, tree: bool = False) -> None:
        self.pid = pid
        self.interval = interval
        self.tree = tree
        self.start_kb = proc_status_kb(pid, "VmRSS")
        self.max_kb = self.start_kb
        self.tree_start_kb = tree_rss_kb(pid) if tree else 0
        self.tree_max_kb = self.tree_start_kb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.max_kb = max(self.max_kb, proc_status_kb(self.pid, "VmRSS"))
        if self.tree:
            self.tree_max_kb = max(self.tree_max_kb, tree_rss_kb(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_loadgen(
    children: Children, spec: dict[str, Any], timeout: float, cpus: frozenset[int] = frozenset()
) -> dict[str, Any]:
    """Run one :mod:`bench.loadgen` scenario in a fresh process (bounded); return its JSON result."""
    argv = [sys.executable, "-m", "bench.loadgen", orjson.dumps(spec).decode()]
    proc = children.spawn(f"loadgen-{spec['kind']}", argv, cpus=cpus, stdout_pipe=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        children.stop(proc)
        raise HarnessError(f"load generator {spec['kind']} ran past {timeout:.0f} s") from None
    if proc.returncode != 0 or not out.strip():
        tail = children.log_tail(f"loadgen-{spec['kind']}")
        raise HarnessError(f"load generator {spec['kind']} failed (exit {proc.returncode}): {tail}")
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return result


def machine_info() -> dict[str, Any]:
    """CPU model, core count, Python version and kernel of this machine."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        from importlib.metadata import version

        loop = f"uvloop {version('uvloop')}"
    except ImportError:  # PackageNotFoundError is an ImportError
        loop = "asyncio"
    import aiohttp

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "aiohttp": aiohttp.__version__,
        "event_loop": loop,
    }
