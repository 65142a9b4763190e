"""``nanobot serve --workers N``: N server processes on one port, and the supervisor that keeps them.

Each worker is a whole ``nanobot serve`` (its own event loop, provider pool and storage pool)
that binds the same host and port with ``SO_REUSEPORT``: the kernel spreads new connections
over them. They share everything that matters through PostgreSQL (sessions, turn leases, the
outbox), so several workers need ``storage.url = postgresql://...``; SQLite is refused.

The supervisor (this process, which never imports the server) starts the workers, each in its
own process group (a terminal's Ctrl-C reaches the supervisor alone, which forwards it once).
Each worker holds one end of a socket pair: it writes a byte there once it listens, and stops
(as on SIGTERM) when the other end closes, so workers never outlive a supervisor that was
killed. The supervisor:

- exits with the worker's exit code when a worker cannot start at first (bad config, port
  taken, database unreachable), after stopping the others;
- restarts a worker that dies unexpectedly, after 1, 2, 4 ... 30 s (back to 1 s once a worker
  has run for a minute), logging one line each time; it gives up (exit 1) only when every
  worker is down and each has failed to start again three times in a row;
- forwards SIGTERM/SIGINT as SIGTERM to every worker (each drains for ``api.shutdownGrace``)
  and kills those still running well after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nanobot.config import Config
from nanobot.errors import ConfigError, NanobotError

log = logging.getLogger("nanobot.workers")

_BACKOFF_FIRST = 1.0  # seconds before the first restart of a worker that died
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 60.0  # a worker up this long has its backoff reset
_GIVE_UP_AFTER = 3  # failed starts in a row of every worker, none running: the supervisor exits
_START_TIMEOUT = 120.0  # seconds a worker may take to listen (migrations, a slow database)
_KILL_AFTER = 15.0  # seconds past api.shutdownGrace before a worker that will not stop is killed


def check_workers(config: Config, flag: bool) -> None:
    """Refuse several workers on SQLite, in one line saying why and what to set."""
    workers = config.api.workers
    if workers > 1 and not config.storage.is_postgres:
        where = f"--workers {workers}" if flag else f"api.workers = {workers}"
        raise ConfigError(
            f"{where}: several processes need shared storage, and SQLite files belong to one process; "
            "set storage.url = postgresql://user:password@host/database in config.json "
            "(or pass --storage-url), or run one worker"
        )


def check_port_free(host: str, port: int) -> None:
    """Fail early (one line) when something already listens on ``host:port``.

    Without this, workers bound with ``SO_REUSEPORT`` would silently join the sockets of another
    supervisor of the same user on that port, and each would get a share of its traffic.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise NanobotError(f"cannot listen on {host}:{port}: {why}") from None


# ---------------------------------------------------------------------------- the worker's side


async def run_worker(config: Config, channel_fd: int, source: str, folder: str | None, index: int) -> None:
    """Serve as one worker: share the port, tell the supervisor once listening, stop when it goes.
    ``folder``: where the workers' metrics sockets are (``/metrics`` adds up every worker)."""
    from nanobot.gateway.worker_metrics import Siblings  # (the supervisor never imports the server)
    from nanobot.runtime import serve

    channel = socket.socket(fileno=channel_fd)
    channel.setblocking(False)
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    siblings = Siblings(Path(folder), index) if folder else None
    serving = serve(config, ready=ready, source=source, reuse_port=True, siblings=siblings)
    server = asyncio.create_task(serving)
    listening = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait((server, listening), return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            await loop.sock_sendall(channel, b"r")
            watch = asyncio.create_task(_stop_when_orphaned(loop, channel))
            try:
                await server
            finally:
                watch.cancel()
        else:
            await server  # it failed to start: its error goes to the CLI
    finally:
        listening.cancel()
        channel.close()


async def _stop_when_orphaned(loop: asyncio.AbstractEventLoop, channel: socket.socket) -> None:
    """The supervisor closes its end only by exiting: then stop as if it had sent SIGTERM."""
    with contextlib.suppress(OSError):
        while await loop.sock_recv(channel, 64):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------------------- the supervisor


@dataclass(slots=True)
class _Worker:
    """One worker slot: its current process, its end of the socket pair, how its starts went."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    channel: socket.socket | None = None  # closing it tells the worker to stop
    started_at: float = 0.0  # (loop time) when it last started listening
    failed_starts: int = 0  # in a row; reset by a start that listens
    delay: float = _BACKOFF_FIRST  # before its next restart

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def close_channel(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()


class Supervisor:
    """Starts ``count`` workers running ``nanobot <argv> --worker-fd FD``, and keeps them running."""

    def __init__(self, argv: Sequence[str], count: int, grace: float) -> None:
        self._argv = list(argv)
        self._folder = ""  # the workers' metrics sockets (made by ``run``, this user only)
        self._workers = [_Worker(i + 1) for i in range(count)]
        self._grace = grace
        self._stopping = asyncio.Event()
        self._gave_up = asyncio.Event()

    async def run(self) -> int:
        """Start every worker and keep them until SIGTERM/SIGINT; return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        self._folder = tempfile.mkdtemp(prefix="nanobot-workers-")  # (mode 0700)
        try:
            first = await asyncio.gather(*(self._start(w) for w in self._workers))
            failed = [code for code in first if code is not None]
            if failed:
                return failed[0] if failed[0] > 0 else 1
            if not self._stopping.is_set():
                pids = ", ".join(str(w.proc.pid) for w in self._workers if w.proc is not None)
                log.info("%d workers ready (pids %s)", len(self._workers), pids)
                await self._supervise()
        finally:
            codes = await self._stop_all()
            shutil.rmtree(self._folder, ignore_errors=True)
        if self._gave_up.is_set():
            return 1
        return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1

    async def _supervise(self) -> None:
        """Restart workers that die, until asked to stop (or until they cannot start any more)."""
        async with asyncio.TaskGroup() as group:
            keepers = [group.create_task(self._keep(w)) for w in self._workers]
            stop = group.create_task(self._stopping.wait())
            gave_up = group.create_task(self._gave_up.wait())
            await asyncio.wait((stop, gave_up), return_when=asyncio.FIRST_COMPLETED)
            self._stopping.set()
            for task in (*keepers, stop, gave_up):
                task.cancel()

    async def _start(self, worker: _Worker) -> int | None:
        """Start ``worker``; None once it listens, else its exit code (it could not start)."""
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        try:
            mine.setblocking(False)
            worker.channel = mine
            worker.proc = proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "nanobot",
                *self._argv,
                "--worker-fd",
                str(theirs.fileno()),
                "--worker-index",
                str(worker.index),
                "--workers-dir",
                self._folder,
                pass_fds=(theirs.fileno(),),
                process_group=0,  # its own group: a terminal's Ctrl-C is ours to forward, once
            )
        finally:
            theirs.close()
        heard = asyncio.create_task(loop.sock_recv(mine, 1))
        exited = asyncio.create_task(proc.wait())
        try:
            done, _ = await asyncio.wait(
                (heard, exited), timeout=_START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            heard.cancel()
            exited.cancel()
        if heard in done and heard.exception() is None and heard.result():
            worker.started_at = loop.time()
            worker.failed_starts = 0
            return None
        if heard in done:  # its end closed without a word: it is exiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), _KILL_AFTER)
        if proc.returncode is None:  # neither listening nor gone in time
            log.error("worker %d (pid %d) did not listen in time: killed", worker.index, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        worker.close_channel()
        worker.failed_starts += 1
        code = proc.returncode
        return code if code is not None and code > 0 else 1

    async def _keep(self, worker: _Worker) -> None:
        """Wait for ``worker`` to die; restart it with backoff, one log line per event."""
        loop = asyncio.get_running_loop()
        while True:
            assert worker.proc is not None
            pid = worker.proc.pid
            code = await worker.proc.wait()
            worker.close_channel()
            if self._stopping.is_set():
                return
            if loop.time() - worker.started_at >= _STABLE_AFTER:
                worker.delay = _BACKOFF_FIRST
            what = f"worker {worker.index} (pid {pid}) {_exit(code)}"
            while True:
                delay = worker.delay
                worker.delay = min(delay * 2, _BACKOFF_MAX)
                log.warning("%s; restarting it in %g s", what, delay)
                await asyncio.sleep(delay)  # the backoff itself, not a wait for work
                failed = await self._start(worker)
                if failed is None:
                    assert worker.proc is not None
                    log.info("worker %d restarted (pid %d)", worker.index, worker.proc.pid)
                    break
                if self._hopeless():
                    log.error("no worker can start (%d failed starts each): giving up", _GIVE_UP_AFTER)
                    self._gave_up.set()
                    return
                what = f"worker {worker.index} could not start again (exit code {failed})"

    def _hopeless(self) -> bool:
        """Every worker is down and failed its last few starts."""
        return all(not w.running and w.failed_starts >= _GIVE_UP_AFTER for w in self._workers)

    async def _stop_all(self) -> list[int]:
        """SIGTERM every running worker, wait for it to drain, kill those that will not stop."""
        running = [w.proc for w in self._workers if w.running and w.proc is not None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if running:
            log.info("stopping %d workers", len(running))
            _done, late = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in running], timeout=self._grace + _KILL_AFTER
            )
            for proc in running:
                if proc.returncode is None:
                    log.error(
                        "worker pid %d did not stop within %g s: killed", proc.pid, self._grace + _KILL_AFTER
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for task in late:
                await task
        for worker in self._workers:
            worker.close_channel()
        return [
            w.proc.returncode for w in self._workers if w.proc is not None and w.proc.returncode is not None
        ]


def _exit(code: int) -> str:
    """How a worker ended, in words."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited unexpectedly (exit code {code})"
