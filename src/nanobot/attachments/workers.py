"""Document extraction off the event loop, in a small pool of killable worker processes.

Why processes, not threads: parsing a hostile or merely huge document is CPU-bound
(it would hold the GIL and stall the gateway) and may never finish. A thread cannot
be stopped; a process can be killed. So each job runs in a worker process and the
per-file ``extract_timeout`` is enforced by killing the worker, which is then replaced.
Workers are also capped in address space (``WORKER_MEMORY_LIMIT``) so a decompression
bomb inside a PDF stream ends in a ``MemoryError``, not an OOM-killed gateway.

Shape: ``size`` (default 2) worker processes, started lazily with the ``spawn`` context
(the gateway has threads; forking it would copy locks held by them). Each worker
pre-imports the parsers, says "ready", then serves one job at a time over a pipe:
a small header, then the file bytes with ``send_bytes`` (no pickled copy). A thread
pool of the same size does the blocking pipe I/O, so the event loop only awaits a
future, and at most ``size`` jobs run at once; the rest queue. The pool is loop-agnostic
(threads and locks, no asyncio primitives), so one instance serves every event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from nanobot.attachments.jobs import ExtractRequest, Outcome
from nanobot.errors import NanobotError

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

POOL_SIZE = 2
MAX_JOBS_PER_WORKER = 100  # then retire the worker, returning whatever memory it fragmented
STARTUP_TIMEOUT = 60.0
WORKER_MEMORY_LIMIT = 2 * 1024**3  # bytes of address space per worker (Unix only)
_READY = "ready"


def _worker_main(conn: Connection) -> None:
    """Entry point of a worker process: warm up, then serve jobs until the pipe closes."""
    _limit_memory()
    warnings.simplefilter("ignore")  # parser warnings about odd files are not the operator's concern
    import pymupdf

    from nanobot.attachments import extract  # imports the parsers (pymupdf, openpyxl): workers only

    tools: Any = pymupdf.TOOLS  # pymupdf's stubs leave these untyped
    tools.mupdf_display_errors(False)
    tools.mupdf_display_warnings(False)
    conn.send(_READY)
    while True:
        try:
            request = conn.recv()
            data = conn.recv_bytes()
        except EOFError:
            return
        conn.send(extract.extract(request, data))


def _limit_memory() -> None:
    try:
        import resource
    except ImportError:  # not on Unix: no address-space cap
        return
    with contextlib.suppress(ValueError, OSError):  # a lower hard limit already in place wins
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT, WORKER_MEMORY_LIMIT))


class _Worker:
    """One extractor process and the parent's end of its pipe."""

    __slots__ = ("conn", "jobs", "process")

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.jobs = 0

    @classmethod
    def start(cls) -> _Worker:
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        process = ctx.Process(target=_worker_main, args=(child_end,), name="nanobot-extractor", daemon=True)
        process.start()
        child_end.close()
        worker = cls(process, parent_end)
        try:
            ready = parent_end.poll(STARTUP_TIMEOUT) and parent_end.recv() == _READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            worker.kill()
            raise NanobotError("the document extractor could not start")
        return worker

    def kill(self) -> None:
        """Stop the process now and release its pipe (safe to call twice)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class _Job:
    """One extraction, cancellable from the event loop while a thread waits on it."""

    __slots__ = ("aborted", "data", "lock", "request", "timeout", "worker")

    def __init__(self, request: ExtractRequest, data: bytes, timeout: float) -> None:
        self.request = request
        self.data = data
        self.timeout = timeout
        self.lock = threading.Lock()
        self.aborted = False
        self.worker: _Worker | None = None

    def abort(self) -> None:
        """Kill the job's worker if it is running (the waiting thread then sees EOF)."""
        with self.lock:
            self.aborted = True
            if self.worker is not None and self.worker.process.is_alive():
                self.worker.process.kill()


class ExtractorPool:
    """At most ``size`` concurrent extractions, each in a worker process it may kill."""

    def __init__(self, size: int = POOL_SIZE) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="nanobot-extract")
        self._closed = False

    async def run(self, request: ExtractRequest, data: bytes, time_limit: float) -> Outcome:
        """Extract ``data`` in a worker; an ``Outcome`` with status ``timeout`` if it took too long."""
        job = _Job(request, data, time_limit)
        future = asyncio.get_running_loop().run_in_executor(self._threads, self._run_blocking, job)
        try:
            return await future
        except asyncio.CancelledError:
            job.abort()
            raise

    def close(self) -> None:
        """Kill every worker and stop the threads (blocking; waits for in-flight jobs to notice)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
            self._workers.clear()
            self._idle.clear()
        for worker in workers:
            worker.kill()
        self._threads.shutdown(wait=True, cancel_futures=True)

    def _run_blocking(self, job: _Job) -> Outcome:
        if job.aborted:  # cancelled while queued: do not even start a worker
            return Outcome("unreadable", "", "was cancelled")
        worker = self._checkout()
        with job.lock:
            if job.aborted:
                self._checkin(worker)
                return Outcome("unreadable", "", "was cancelled")
            job.worker = worker
        try:
            worker.conn.send(job.request)
            worker.conn.send_bytes(job.data)
            if not worker.conn.poll(job.timeout):
                self._discard(worker)
                return Outcome("timeout", "", f"took longer than {job.timeout:g}s to read")
            outcome: Outcome = worker.conn.recv()
        except (EOFError, OSError):  # the worker died: crashed, out of memory, or aborted
            self._discard(worker)
            return Outcome("unreadable", "", "could not be read (the extractor stopped)")
        worker.jobs += 1
        self._checkin(worker)
        return outcome

    def _checkout(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise NanobotError("the document extractor is shut down")
            if self._idle:
                return self._idle.pop()
        worker = _Worker.start()
        with self._lock:
            if self._closed:
                worker.kill()
                raise NanobotError("the document extractor is shut down")
            self._workers.add(worker)
        return worker

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed and worker.jobs < MAX_JOBS_PER_WORKER and worker.process.is_alive():
                self._idle.append(worker)
                return
        self._discard(worker)

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
        worker.kill()


_pool: ExtractorPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> ExtractorPool:
    """The process-wide extractor pool, created on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ExtractorPool()
        return _pool


async def shutdown_extractors() -> None:
    """Stop the extractor processes (the runtime calls this on exit; a later upload restarts them)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        await asyncio.to_thread(pool.close)
