"""The Telegram channel, on the Bot API with plain aiohttp.

Receiving is ``getUpdates`` long polling, by the one process that leads the channel (see
:mod:`nanobot.storage.inbound`: with several processes on PostgreSQL the others only send), or
webhook mode (``channels.telegram.webhook``): ``setWebhook`` at start, then Telegram POSTs each
update to every process behind the URL (:mod:`nanobot.gateway.telegram_webhook`). Either way an
update's id is recorded before it is handed on, so it is handled once. Sending is
``sendMessage`` with Markdown rendered as Telegram HTML, split under 4096 characters, and
resent as plain text when Telegram cannot parse the markup. Bot API answers are mapped to our
error tree in one place, :func:`check_response`. A ``document`` or ``photo`` (its largest
size) goes to the channel's :class:`~nanobot.channels.files.FileIntake`: ``getFile``, then a
capped download from ``{api_base}/file/bot{token}/{file_path}``, with the caption as the text.

The bot token is part of every URL (``{api_base}/bot{token}/METHOD``), and aiohttp puts
URLs into its exception messages. So every aiohttp error is re-raised here with the
token redacted and *without* chaining (``from None``): a logged traceback must not carry
the original exception's text.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiohttp
import orjson

from nanobot.bus import InboundMessage, MessageBus, OutboundMessage
from nanobot.channels.allow import AllowList
from nanobot.channels.base import Channel
from nanobot.channels.files import FileIntake, FileLimits, RemoteFile, download
from nanobot.channels.text import markdown_to_telegram_html, split_markdown, utf16_len
from nanobot.config import Config, TelegramConfig
from nanobot.errors import ChannelError, ChannelPermanentError, ChannelRetryableError, StorageError
from nanobot.storage.inbound import ChannelInbound, SoloInbound, open_inbound

log = logging.getLogger(__name__)

MAX_MESSAGE_LENGTH = 4096  # UTF-16 code units, after entity parsing
SEND_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)
_JSON = {"Content-Type": "application/json"}
ALLOWED_UPDATES = ["message"]


def check_response(method: str, status: int, body: bytes) -> Any:
    """Return a Bot API call's ``result``, or raise the matching :class:`ChannelError`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and data.get("ok") is True:
        return data.get("result")
    detail = data if isinstance(data, dict) else {}
    code = detail.get("error_code", status)
    description = str(detail.get("description") or f"HTTP {status}")
    message = f"telegram {method}: {description} ({code})"
    if code == 429 or status == 429:
        params = detail.get("parameters")
        retry_after = params.get("retry_after") if isinstance(params, dict) else None
        wait = float(retry_after) if isinstance(retry_after, int | float) else None
        raise ChannelRetryableError(message, retry_after=wait)
    if status >= 500 or (isinstance(code, int) and code >= 500):
        raise ChannelRetryableError(message)
    raise ChannelPermanentError(message)


def _obj(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _cannot_parse(exc: ChannelPermanentError) -> bool:
    return "can't parse entities" in exc.message.lower()


def _size(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _update_id(update: object) -> int | None:
    """An update's ``update_id``, when it is a well-formed update."""
    if not isinstance(update, dict):
        return None
    value = update.get("update_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def message_files(message: dict[str, Any]) -> list[RemoteFile]:
    """The file a message carries: its ``document``, or the largest size of its ``photo``."""
    document = _obj(message.get("document"))
    if isinstance(document.get("file_id"), str):
        name = str(document.get("file_name") or "document")
        return [RemoteFile(name, _size(document.get("file_size")), document["file_id"])]
    photos = message.get("photo")
    photos = photos if isinstance(photos, list) else []
    sizes = [p for p in photos if isinstance(p, dict) and isinstance(p.get("file_id"), str)]
    if not sizes:
        return []
    best = max(sizes, key=lambda p: (_size(p.get("width")) or 0) * (_size(p.get("height")) or 0))
    return [RemoteFile("photo.jpg", _size(best.get("file_size")), best["file_id"])]


class TelegramChannel(Channel):
    """Telegram via the Bot API: long polling in, ``sendMessage`` out."""

    name = "telegram"

    def __init__(
        self,
        config: TelegramConfig,
        bus: MessageBus,
        limits: FileLimits | None = None,
        inbound: ChannelInbound | None = None,
    ) -> None:
        self._config = config
        self._inbound: ChannelInbound = inbound if inbound is not None else SoloInbound()
        self._bus = bus
        self._base = f"{config.api_base.rstrip('/')}/bot{config.token}"
        self._allow = AllowList(self.name, config.allow_from)
        self._files = FileIntake(self.name, bus, limits or FileLimits())
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self.username = ""

    @classmethod
    def from_config(cls, config: Config, bus: MessageBus) -> TelegramChannel | None:
        """The channel when ``channels.telegram.enabled``, else None; files obey ``api``'s limits,
        and its inbound side is shared through ``storage`` (one leader, recorded update ids)."""
        telegram = config.channels.telegram
        if not telegram.enabled:
            return None
        inbound = open_inbound(config.storage, cls.name, telegram.token)
        return cls(telegram, bus, FileLimits.from_api(config.api), inbound)

    def __repr__(self) -> str:
        return f"TelegramChannel(api_base={self._config.api_base!r}, username={self.username!r})"

    @property
    def leading(self) -> bool:
        """Whether this process receives updates: in webhook mode every process does."""
        return self._config.webhook.enabled or self._inbound.leading

    def _redact(self, text: str) -> str:
        token = self._config.token
        return text.replace(token, "<token>") if token else text

    async def start(self) -> None:
        """Check the token with ``getMe``, then set the webhook, or poll whenever this process leads."""
        if not self._config.token:
            raise ChannelPermanentError("telegram: channels.telegram.token is empty")
        self._session = aiohttp.ClientSession()
        try:
            me = await self.call("getMe", {})
        except ChannelPermanentError as exc:
            raise ChannelPermanentError(
                f"telegram: the bot token was rejected ({exc.message}); check channels.telegram.token"
            ) from None
        self.username = str(me.get("username", "")) if isinstance(me, dict) else ""
        log.info("telegram: connected as @%s", self.username)
        webhook = self._config.webhook
        if webhook.enabled:
            payload = {"url": webhook.url, "secret_token": webhook.secret, "allowed_updates": ALLOWED_UPDATES}
            await self.call("setWebhook", payload)
            log.info("telegram: webhook mode: Telegram posts updates to %s", webhook.url)
            return
        self._poller = asyncio.create_task(self._inbound.lead(self._poll), name="telegram-poll")

    async def stop(self) -> None:
        """Stop polling and the files in progress, then close the HTTP session; safe to call twice."""
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        await self._files.stop()
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        await self._inbound.close()

    async def call(
        self, method: str, payload: dict[str, Any], limits: aiohttp.ClientTimeout = SEND_TIMEOUT
    ) -> Any:
        """Call a Bot API method; errors come back as :class:`ChannelError` with the token redacted."""
        if self._session is None:
            raise ChannelRetryableError("telegram: channel is not started")
        url = f"{self._base}/{method}"
        try:
            data = orjson.dumps(payload)
            async with self._session.post(url, data=data, headers=_JSON, timeout=limits) as resp:
                body = await resp.read()
                status = resp.status
        except TimeoutError:
            raise ChannelRetryableError(f"telegram {method}: timed out") from None
        except aiohttp.ClientError as exc:
            # from None, not from exc: aiohttp's message may contain the URL, hence the token.
            reason = self._redact(f"{type(exc).__name__}: {exc}")
            raise ChannelRetryableError(f"telegram {method}: network error: {reason}") from None
        try:
            return check_response(method, status, body)
        except ChannelError as exc:
            exc.message = self._redact(exc.message)
            exc.args = (exc.message,)
            raise

    # ----------------------------------------------------------------------- sending

    async def send(self, msg: OutboundMessage) -> None:
        """Send ``msg`` as one or more messages; resumes after ``metadata["parts_done"]``."""
        parts = split_markdown(msg.content.strip(), MAX_MESSAGE_LENGTH, utf16_len)
        done = int(msg.metadata.get("parts_done", "0"))
        for index in range(done, len(parts)):
            if parts[index].strip():
                await self._send_part(msg.chat_id, parts[index])
            msg.metadata["parts_done"] = str(index + 1)

    async def _send_part(self, chat_id: str, text: str) -> None:
        html = markdown_to_telegram_html(text)
        payload: dict[str, Any] = {"chat_id": chat_id, "text": html, "parse_mode": "HTML"}
        try:
            await self.call("sendMessage", payload)
        except ChannelPermanentError as exc:
            if not _cannot_parse(exc):
                raise
            log.info("telegram: markup rejected (%s); sending as plain text", exc.message)
            await self.call("sendMessage", {"chat_id": chat_id, "text": text})

    # ----------------------------------------------------------------------- receiving

    async def _poll(self) -> None:
        """Long-poll ``getUpdates`` (while this process leads), backing off on errors.

        A webhook left from webhook mode is deleted first (Telegram refuses ``getUpdates`` while
        one is set). Each batch's ids are recorded before its updates are handed on; what another
        process (an earlier leader) took already is skipped. A batch that cannot be recorded is
        not confirmed: the next call gets it again.
        """
        offset = 0
        failures = 0
        wait = self._config.poll_timeout
        timeout = aiohttp.ClientTimeout(total=wait + 15, sock_connect=10)
        webhook_deleted = False
        while True:
            try:
                if not webhook_deleted:
                    await self.call("deleteWebhook", {"drop_pending_updates": False})
                    webhook_deleted = True
                payload = {"offset": offset, "timeout": wait, "allowed_updates": ALLOWED_UPDATES}
                updates = await self.call("getUpdates", payload, timeout)
                batch = [u for u in updates if _update_id(u) is not None] if isinstance(updates, list) else []
                fresh = set(await self._inbound.fresh([str(u["update_id"]) for u in batch]))
            except (ChannelError, StorageError) as exc:
                failures += 1
                delay = exc.retry_after if isinstance(exc, ChannelRetryableError) else None
                delay = delay if delay is not None else min(60.0, 2.0**failures) * random.uniform(0.5, 1.0)
                log.warning("telegram: polling failed (%s); retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            for update in batch:
                offset = max(offset, update["update_id"] + 1)
                if str(update["update_id"]) in fresh:
                    self._receive(update)

    async def take_update(self, update: dict[str, Any]) -> None:
        """Hand on one update Telegram posted to the webhook, unless it was taken before (Telegram
        retries a call it did not see answered). StorageError: not recorded, so not handed on."""
        update_id = _update_id(update)
        if update_id is None:
            return
        if self._session is None:
            raise ChannelRetryableError("telegram: channel is not started")
        if await self._inbound.fresh([str(update_id)]):
            self._receive(update)

    def _receive(self, update: dict[str, Any]) -> None:
        """Turn one update with a text or file message into an InboundMessage, if its sender is allowed."""
        message = _obj(update.get("message"))
        text = message.get("text")
        files = [] if isinstance(text, str) else message_files(message)
        if not isinstance(text, str) and not files:
            return
        sender, chat = _obj(message.get("from")), _obj(message.get("chat"))
        if "id" not in chat or sender.get("is_bot"):
            return
        sender_id = str(sender.get("id", ""))
        username = str(sender.get("username", ""))
        if not self._allow.permits(sender_id, username):
            return  # before any download: a stranger's file is never fetched
        metadata = {"message_id": str(message.get("message_id", "")), "username": username,
                    "chat_type": str(chat.get("type", ""))}  # fmt: skip
        caption = message.get("caption")
        said = text if isinstance(text, str) else caption if isinstance(caption, str) else ""
        base = InboundMessage(self.name, str(chat["id"]), said, sender_id, metadata=metadata)
        if files:
            self._files.accept(base, files, self._fetch)
        else:
            self._files.publish(base)

    async def _fetch(self, file: RemoteFile) -> bytes:
        """``getFile``, then download the file with the size cap (the token stays out of errors)."""
        info = _obj(await self.call("getFile", {"file_id": file.ref}))
        path = info.get("file_path")
        if not isinstance(path, str) or not path:
            raise ChannelPermanentError(f"telegram getFile: no file_path for {file.name}")
        self._files.check_size(file.name, _size(info.get("file_size")))
        if self._session is None:
            raise ChannelRetryableError("telegram: channel is not started")
        url = f"{self._config.api_base.rstrip('/')}/file/bot{self._config.token}/{path.lstrip('/')}"
        limit = self._files.limits.attachments.max_file_bytes
        return await download(self._session, url, file.name, limit, self._redact)
