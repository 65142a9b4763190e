"""A running server's channels over time: when to try again, late starts, hand edits.

*Trying again.* :class:`RetryPolicy` is the one backoff (exponential with jitter, capped
at ``channels.retryMaxSeconds``; a server's ``retry_after`` wins) for deliveries and starts.

*Late starts.* A channel whose platform cannot be reached at start (a network error, a
5xx or a 429 on the token check) is not given up on: :func:`keep_starting` tries again in
the background, and calls ``on_up`` once it is up. A refused token (any other error)
keeps the channel down, with one error line, as before.

*Hand edits.* ``nanobot outbox retry|drop`` changes ``outbox.db`` from another process.
While :func:`reload_on_signal` is active, the server names itself in
``<workspace>/nanobot.pid`` and re-reads the outbox on ``SIGUSR1`` (:func:`reconcile`
decides what the re-read changes). :func:`notify_server` is the CLI's half: it sends
that signal, and only to a live ``nanobot serve``, so a stale file (a killed server, a
reused pid) is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from pathlib import Path

from nanobot.channels.base import Channel
from nanobot.config import ChannelsConfig
from nanobot.errors import ChannelError, ChannelRetryableError
from nanobot.storage.outbox import OutboxEntry

log = logging.getLogger(__name__)

PID_FILE = "nanobot.pid"
_PROC = Path("/proc")


class RetryPolicy:
    """Exponential backoff with jitter; a server's ``retry_after`` overrides it."""

    __slots__ = ("base", "cap", "max_attempts")

    def __init__(self, config: ChannelsConfig) -> None:
        self.base = config.retry_base_seconds  # set tiny in tests to make backoff instant
        self.cap = config.retry_max_seconds
        self.max_attempts = max(1, config.max_attempts)

    def delay(self, attempts: int, retry_after: float | None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        if retry_after is not None:
            return max(0.0, float(retry_after))
        backoff = min(self.cap, self.base * 2.0 ** (attempts - 1))
        return backoff * random.uniform(0.5, 1.0)


# --------------------------------------------------------------------------- late starts


async def try_start(channel: Channel) -> ChannelRetryableError | None:
    """Start ``channel``: None when it is up, else the retryable error (the channel is stopped).

    Any other :class:`ChannelError` (a refused token) is raised, after stopping the channel.
    """
    try:
        await channel.start()
    except ChannelError as exc:
        await channel.stop()  # release what a half-done start opened (its HTTP session)
        if isinstance(exc, ChannelRetryableError):
            return exc
        raise
    return None


async def keep_starting(
    channel: Channel, error: ChannelRetryableError, policy: RetryPolicy, on_up: Callable[[Channel], None]
) -> None:
    """Retry starting ``channel`` after ``error`` until it is up (then ``on_up``) or refused for good."""
    attempts = 0
    while True:
        attempts += 1
        wait = policy.delay(attempts, error.retry_after)
        log.warning("channel %s is unreachable (%s); retrying in %.1fs", channel.name, error.message, wait)
        await asyncio.sleep(wait)
        try:
            result = await try_start(channel)
        except ChannelError as exc:
            log.error("channel %s is down: %s", channel.name, exc)
            return
        if result is None:
            log.info("channel %s is up after %d retries", channel.name, attempts)
            on_up(channel)
            return
        error = result


# --------------------------------------------------------------------------- hand edits


@dataclass(frozen=True, slots=True)
class Edits:
    """What a re-read of the outbox changes for the lanes."""

    new: list[OutboxEntry]  # pending rows no lane holds: queue them
    dropped: list[int]  # queued ids whose row is gone (or no longer pending): skip them
    retried: list[OutboxEntry]  # queued entries reset by hand (fresh attempts, due now): wake their lanes


def reconcile(
    rows: list[OutboxEntry], queued: Mapping[int, OutboxEntry], watched: Set[int], seen: Set[int]
) -> Edits:
    """Compare a re-read (``rows``, the pending ones) with the lanes (``queued``, by id).

    ``watched`` are the ids queued before the read began: only their rows can tell that
    they were dropped or reset. ``seen`` are ids queued during the read; neither is queued
    again, even if it has been delivered since (the read may predate that). A queued
    entry whose row was written after its own last save was reset by ``outbox retry``:
    it takes the row's fresh attempts and due time.
    """
    pending = {row.id: row for row in rows}
    new = [row for row in rows if row.id not in queued and row.id not in watched and row.id not in seen]
    dropped = [i for i in queued if i in watched and i not in pending]
    retried = []
    for i, entry in queued.items():
        row = pending.get(i)
        if i in watched and row is not None and row.updated_at > entry.updated_at:
            entry.attempts, entry.next_at, entry.updated_at = row.attempts, row.next_at, row.updated_at
            entry.created_at = row.created_at
            retried.append(entry)
    return Edits(new, dropped, retried)


@contextlib.contextmanager
def reload_on_signal(workspace: Path, reload: Callable[[], None]) -> Iterator[None]:
    """While inside: ``SIGUSR1`` calls ``reload``, and ``<workspace>/nanobot.pid`` names this process.

    The file is written only once the handler is in place (the signal's default action
    would end the process), and removed on the way out if it still names us.
    """
    loop = asyncio.get_running_loop()
    sig = _listen(loop, reload)
    if sig is None:
        yield
        return
    path = workspace / PID_FILE
    mine = f"{os.getpid()}\n"
    try:
        _write_atomically(path, mine)
    except OSError as exc:
        log.warning("cannot write %s (%s): outbox changes by hand wait for a restart", path, exc)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # first the file, so no one signals us without a handler
            if path.read_text() == mine:
                path.unlink()
        loop.remove_signal_handler(sig)


def _listen(loop: asyncio.AbstractEventLoop, reload: Callable[[], None]) -> signal.Signals | None:
    """Call ``reload`` on SIGUSR1; the signal, or None where that is impossible."""
    sig: signal.Signals | None = getattr(signal, "SIGUSR1", None)
    if sig is None:  # Windows
        log.info("outbox changes by hand take effect at the next start (no SIGUSR1 here)")
        return None
    try:
        loop.add_signal_handler(sig, reload)
    except (NotImplementedError, RuntimeError, ValueError) as exc:  # not the main thread
        log.info("outbox changes by hand take effect at the next start (%s)", exc)
        return None
    return sig


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


def notify_server(workspace: Path) -> int | None:
    """Ask the ``nanobot serve`` running on ``workspace`` to re-read its outbox; its pid, or None."""
    pid = _server_pid(workspace / PID_FILE)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGUSR1)
    except (ProcessLookupError, PermissionError):  # it exited just now, or is not ours
        return None
    return pid


def _server_pid(path: Path) -> int | None:
    """The pid in ``path`` if it is a live ``nanobot serve``; a stale or foreign pid gives None."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    if not _PROC.is_dir():  # no /proc (macOS): whether it is alive is all we can check
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid
    try:
        argv = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:  # no such process
        return None
    is_nanobot = any(b"nanobot" in arg for arg in argv)
    return pid if is_nanobot and b"serve" in argv else None
