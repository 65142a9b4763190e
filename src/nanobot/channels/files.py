"""Files sent on chat platforms, turned into agent input through the upload pipeline.

A platform channel that receives a message with files hands them to its
:class:`FileIntake`: declared sizes are checked first (nothing too big is downloaded),
then each file is fetched with a running byte cap (:func:`download`), sniffed and
extracted by :func:`~nanobot.attachments.prepare_file`, and composed with the caption
into one :class:`~nanobot.bus.InboundMessage`. A file that is refused (too big,
unsupported, unreadable, not downloadable) gets a short reply in the same chat, sent
through the bus and the outbox like every reply, and no agent turn runs.

The work runs in tasks the intake owns, so a slow download never holds up the platform's
receive loop; :meth:`FileIntake.stop` cancels and awaits them. Messages from one chat
still reach the agent in the order they were sent: while a chat has files in progress,
its later messages wait for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from nanobot.attachments import AttachmentLimits, PreparedFile, compose_user_input, prepare_file
from nanobot.bus import InboundMessage, MessageBus, OutboundKind, OutboundMessage
from nanobot.config import ApiConfig
from nanobot.errors import (
    ChannelError,
    ChannelRetryableError,
    NanobotError,
    PayloadTooLargeError,
    RequestError,
)

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10, sock_read=30)
_CHUNK = 64 * 1024
BUG_REPLY = "Sorry, something went wrong while reading your file. Please try again."


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file a platform message refers to: display name, declared size, and where to get it."""

    name: str
    size: int | None  # as the platform declared it; None when unknown
    ref: str  # the platform's handle: a Telegram ``file_id``, a Discord attachment URL


@dataclass(frozen=True, slots=True)
class FileLimits:
    """What the channels accept: the upload pipeline's limits, and files per message."""

    attachments: AttachmentLimits = field(default_factory=AttachmentLimits)
    max_files: int = 16

    @classmethod
    def from_api(cls, api: ApiConfig) -> FileLimits:
        """The limits configured under ``api`` (the same ones the HTTP API enforces)."""
        return cls(AttachmentLimits.from_api(api), api.max_files)


Fetch = Callable[[RemoteFile], Awaitable[bytes]]


def describe_size(n: int) -> str:
    """``n`` bytes for people: ``10 MiB`` when exact, else ``1,234 bytes``."""
    mib = 1024 * 1024
    if n >= mib and n % mib == 0:
        return f"{n // mib} MiB"
    return f"{n:,} bytes"


def too_large(name: str, size: int | None, limit: int) -> PayloadTooLargeError:
    """The error for a file over ``limit`` bytes (``size`` when known)."""
    what = f"is {describe_size(size)}" if size is not None else "is too large"
    return PayloadTooLargeError(f"{name} {what}; the limit is {describe_size(limit)} per file")


def origin(url: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of an absolute http(s) URL, default ports filled in; else None."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return None
    if not parsed.is_absolute() or parsed.scheme not in ("http", "https") or not parsed.host:
        return None
    return parsed.scheme, parsed.host.lower(), parsed.port


def refusal_text(exc: NanobotError) -> str:
    """The short reply a user gets when their file is refused."""
    if isinstance(exc, ChannelRetryableError):
        return f"Sorry, I could not download your file ({exc.message}). Please try sending it again."
    if isinstance(exc, ChannelError):
        return f"Sorry, I could not download your file ({exc.message})."
    return f"Sorry, I can't read that file: {exc.message}"


async def download(
    session: aiohttp.ClientSession, url: str, name: str, max_bytes: int, redact: Callable[[str], str] = str
) -> bytes:
    """GET ``url`` (no redirects), refusing more than ``max_bytes``; errors never chain aiohttp's.

    Raises :class:`PayloadTooLargeError` as soon as the body passes the limit (nothing
    past it is buffered) and :class:`ChannelRetryableError` for HTTP and network
    failures, with ``redact`` applied to their text (the URL may hold a token).
    """
    try:
        async with session.get(url, timeout=DOWNLOAD_TIMEOUT, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ChannelRetryableError(f"could not fetch {name}: HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise too_large(name, resp.content_length, max_bytes)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(_CHUNK):
                if len(body) + len(chunk) > max_bytes:
                    raise too_large(name, None, max_bytes)
                body += chunk
            return bytes(body)
    except TimeoutError:
        raise ChannelRetryableError(f"could not fetch {name}: timed out") from None
    except aiohttp.ClientError as exc:
        # from None: aiohttp's message may contain the URL, and with it a token.
        reason = redact(f"{type(exc).__name__}: {exc}")
        raise ChannelRetryableError(f"could not fetch {name}: {reason}") from None


class FileIntake:
    """Turns one channel's file messages into inbound messages, off its receive loop."""

    def __init__(self, channel: str, bus: MessageBus, limits: FileLimits) -> None:
        self._channel = channel
        self._bus = bus
        self.limits = limits
        self._tasks: set[asyncio.Task[None]] = set()
        self._tails: dict[str, asyncio.Task[None]] = {}  # chat id → its latest pending task

    def publish(self, msg: InboundMessage) -> None:
        """Hand a text message to the agent, after any files still in progress in its chat."""
        tail = self._tails.get(msg.chat_id)
        if tail is None:
            self._bus.publish_inbound(msg)
            return
        self._chain(msg.chat_id, self._publish_after(tail, msg))

    def refuse(self, chat_id: str, exc: NanobotError) -> None:
        """Tell the chat why its file was refused (a REPLY through the bus and the outbox)."""
        log.info("%s: refused a file in chat %s: %s", self._channel, chat_id, exc.message)
        self._reply(chat_id, refusal_text(exc))

    def check_size(self, name: str, size: int | None) -> None:
        """Raise :class:`PayloadTooLargeError` when a declared ``size`` is over the per-file limit."""
        limit = self.limits.attachments.max_file_bytes
        if size is not None and size > limit:
            raise too_large(name, size, limit)

    def accept(self, base: InboundMessage, files: Sequence[RemoteFile], fetch: Fetch) -> None:
        """Check, fetch and prepare ``files`` in the background, then publish ``base`` with them.

        ``base`` carries the chat, sender, caption and metadata. Declared sizes and the
        file count are checked here, before anything is downloaded.
        """
        try:
            self._precheck(files)
        except NanobotError as exc:
            self.refuse(base.chat_id, exc)
            return
        self._chain(base.chat_id, self._take(self._tails.get(base.chat_id), base, files, fetch))

    async def stop(self) -> None:
        """Cancel the files in progress and wait for their tasks to end; safe to call twice."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tails.clear()

    # ----------------------------------------------------------------------- internals

    def _precheck(self, files: Sequence[RemoteFile]) -> None:
        if len(files) > self.limits.max_files:
            raise RequestError(f"too many files: {len(files)}; at most {self.limits.max_files} per message")
        for file in files:
            self.check_size(file.name, file.size)

    def _chain(self, chat_id: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"{self._channel}-file")
        self._tasks.add(task)
        self._tails[chat_id] = task

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if self._tails.get(chat_id) is finished:
                del self._tails[chat_id]
            if not finished.cancelled() and finished.exception() is not None:
                log.error("%s: file task crashed", self._channel, exc_info=finished.exception())

        task.add_done_callback(done)

    async def _publish_after(self, previous: asyncio.Task[None], msg: InboundMessage) -> None:
        await asyncio.wait([previous])  # its outcome is its own business: only the order matters here
        self._bus.publish_inbound(msg)

    async def _take(
        self, previous: asyncio.Task[None] | None, base: InboundMessage, files: Sequence[RemoteFile],
        fetch: Fetch,
    ) -> None:  # fmt: skip
        """Prepare the files (concurrently with earlier work), then publish in the chat's order."""
        inbound: InboundMessage | None = None
        try:
            user = compose_user_input(base.content, await self._prepare_all(files, fetch))
            inbound = InboundMessage(base.channel, base.chat_id, user.content, base.sender_id,
                                     images=user.images, history_content=user.history,
                                     metadata=base.metadata)  # fmt: skip
        except NanobotError as exc:
            self.refuse(base.chat_id, exc)
        except Exception:  # a bug: the user still hears something, the log gets the traceback
            log.exception("%s: could not prepare a file in chat %s", self._channel, base.chat_id)
            self._reply(base.chat_id, BUG_REPLY)
        if previous is not None:
            await asyncio.wait([previous])
        if inbound is not None:
            self._bus.publish_inbound(inbound)

    async def _prepare_all(self, files: Sequence[RemoteFile], fetch: Fetch) -> list[PreparedFile]:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._prepare_one(file, fetch)) for file in files]
        except* NanobotError as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _prepare_one(self, file: RemoteFile, fetch: Fetch) -> PreparedFile:
        return await prepare_file(file.name, await fetch(file), self.limits.attachments)

    def _reply(self, chat_id: str, text: str) -> None:
        self._bus.publish_outbound(OutboundMessage(self._channel, chat_id, text, OutboundKind.REPLY))
