"""The Discord channel, with plain aiohttp: REST to send, the Gateway websocket to receive.

Sending posts each part (under 2000 characters) with a ``nonce`` derived from the outbox
entry and ``enforce_nonce``, so a retry after a lost response never posts twice. Rate
limits: a 429's ``retry_after`` goes back to the outbox; ``X-RateLimit-Remaining: 0``
makes the next request to that chat wait ``X-RateLimit-Reset-After``.

Receiving follows the Gateway protocol: HELLO → heartbeats (with ACK tracking) →
IDENTIFY, or RESUME with ``session_id`` and the last sequence number after a drop.
The protocol lives in ``DiscordGateway``; this module's channel only turns
``MESSAGE_CREATE`` into inbound messages. Discord allows one Gateway session per shard, so only
the process that leads the channel connects (:mod:`nanobot.storage.inbound`; with several
processes on PostgreSQL the others only send), and each message's id is recorded before it is
handed on: a new leader after a crash never hands one on twice. Its ``attachments`` go to the channel's
:class:`~nanobot.channels.files.FileIntake`, downloaded only from Discord's CDN hosts
or the configured ``api_base``'s origin: the server never fetches arbitrary URLs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson

from nanobot.bus import InboundMessage, MessageBus, OutboundMessage
from nanobot.channels.allow import AllowList
from nanobot.channels.base import Channel
from nanobot.channels.discord_gateway import DiscordGateway
from nanobot.channels.files import FileIntake, FileLimits, RemoteFile, download, origin
from nanobot.channels.text import split_markdown
from nanobot.config import Config, DiscordConfig
from nanobot.errors import ChannelPermanentError, ChannelRetryableError, RequestError, StorageError
from nanobot.storage.inbound import ChannelInbound, ResumePoint, SoloInbound, open_inbound

log = logging.getLogger(__name__)

MAX_MESSAGE_LENGTH = 2000
REST_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)
CDN_ORIGINS = ("https://cdn.discordapp.com", "https://media.discordapp.net")


def check_response(status: int, body: bytes, headers: dict[str, str]) -> Any:
    """Return a REST call's JSON body, or raise the matching ``ChannelError``."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    if 200 <= status < 300:
        return data
    detail = data if isinstance(data, dict) else {}
    message = f"discord: {detail.get('message') or 'HTTP error'} (HTTP {status})"
    if status == 429:
        retry_after = detail.get("retry_after", headers.get("Retry-After"))
        try:
            wait = float(retry_after) if retry_after is not None else None
        except ValueError:
            wait = None
        raise ChannelRetryableError(message, retry_after=wait)
    if status >= 500:
        raise ChannelRetryableError(message)
    raise ChannelPermanentError(message)


class DiscordChannel(Channel):
    """Discord: the Gateway in, REST ``POST /channels/{id}/messages`` out."""

    name = "discord"

    def __init__(
        self,
        config: DiscordConfig,
        bus: MessageBus,
        limits: FileLimits | None = None,
        inbound: ChannelInbound | None = None,
    ) -> None:
        self._config = config
        self._inbound: ChannelInbound = inbound if inbound is not None else SoloInbound()
        self._bus = bus
        self._allow = AllowList(self.name, config.allow_from)
        self._files = FileIntake(self.name, bus, limits or FileLimits())
        self._trusted = {o for o in (origin(config.api_base), *map(origin, CDN_ORIGINS)) if o is not None}
        self._session: aiohttp.ClientSession | None = None
        self._gateway: DiscordGateway | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._ready_at: dict[str, float] = {}  # chat id → when its rate-limit bucket refills
        self.user_id = ""

    @classmethod
    def from_config(cls, config: Config, bus: MessageBus) -> DiscordChannel | None:
        """The channel when ``channels.discord.enabled``, else None; files obey ``api``'s limits,
        and its inbound side is shared through ``storage`` (one leader, recorded message ids)."""
        discord = config.channels.discord
        if not discord.enabled:
            return None
        inbound = open_inbound(config.storage, cls.name, discord.token, config.agents.defaults.workspace_path)
        return cls(discord, bus, FileLimits.from_api(config.api), inbound)

    def __repr__(self) -> str:
        return f"DiscordChannel(api_base={self._config.api_base!r}, user_id={self.user_id!r})"

    @property
    def gateway(self) -> DiscordGateway | None:
        """The Gateway connection, while this process leads."""
        return self._gateway

    @property
    def leading(self) -> bool:
        """Whether this process holds the channel's one Gateway session."""
        return self._inbound.leading

    async def start(self) -> None:
        """Check the token (``GET /users/@me``), then connect to the Gateway whenever this process leads."""
        if not self._config.token:
            raise ChannelPermanentError("discord: channels.discord.token is empty")
        self._session = aiohttp.ClientSession()
        try:
            me = await self._request("GET", "/users/@me")
        except ChannelPermanentError as exc:
            raise ChannelPermanentError(
                f"discord: the bot token was rejected ({exc.message}); check channels.discord.token"
            ) from None
        self.user_id = str(me.get("id", "")) if isinstance(me, dict) else ""
        self._receiver = asyncio.create_task(self._inbound.lead(self._connect), name="discord-gateway")

    async def _connect(self) -> None:
        """Hold the Gateway session (while this process leads: cancelled when the lead is lost)."""
        assert self._session is not None  # (started)
        resumable = self._inbound.resumable  # stopped, the session stays open for the next run
        gateway = self._gateway = DiscordGateway(
            self._session, self._config, self._on_dispatch, hand_over=resumable
        )
        try:  # the session the last leader held (a process that died): resumed, Discord replays the gap
            saved = await self._inbound.resume_point()
        except StorageError as exc:
            log.warning("discord: last leader's session unknown (%s); identifying afresh", exc.message)
            saved = None
        if saved is not None:
            gateway.session_id, gateway.resume_url, gateway.seq = saved
        try:
            await gateway.run()
        finally:
            point = self._resume_point()
            self._gateway = None
            if resumable and point is not None:  # where it stands now (still leading: nobody else writes)
                try:
                    await self._inbound.fresh([], point)
                except StorageError as exc:
                    log.warning("discord: session not recorded at stop (%s)", exc.message)

    async def stop(self) -> None:
        """Disconnect from the Gateway, stop the files in progress, close the HTTP session; safe twice."""
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        await self._files.stop()
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        await self._inbound.close()

    async def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        if self._session is None:
            raise ChannelRetryableError("discord: channel is not started")
        url = f"{self._config.api_base.rstrip('/')}{path}"
        data = orjson.dumps(payload) if payload is not None else None
        # Per request, not on the session: the session also opens the Gateway websocket.
        headers = {"Authorization": f"Bot {self._config.token}", "User-Agent": "DiscordBot (nanobot, 0.1)"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            request = self._session.request(method, url, data=data, headers=headers, timeout=REST_TIMEOUT)
            async with request as resp:
                body = await resp.read()
                status, resp_headers = resp.status, dict(resp.headers)
        except TimeoutError:
            raise ChannelRetryableError(f"discord {method} {path}: timed out") from None
        except aiohttp.ClientError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise ChannelRetryableError(f"discord {method} {path}: network error: {reason}") from exc
        self._note_rate_limit(path, resp_headers)
        return check_response(status, body, resp_headers)

    def _note_rate_limit(self, path: str, headers: dict[str, str]) -> None:
        if headers.get("X-RateLimit-Remaining") != "0":
            return
        try:
            reset_after = float(headers.get("X-RateLimit-Reset-After", "0"))
        except ValueError:
            return
        self._ready_at[path] = time.monotonic() + reset_after

    # ----------------------------------------------------------------------- sending

    async def send(self, msg: OutboundMessage) -> None:
        """Post ``msg`` in parts, each with a stable nonce; resumes after ``metadata["parts_done"]``."""
        parts = split_markdown(msg.content.strip(), MAX_MESSAGE_LENGTH)
        path = f"/channels/{msg.chat_id}/messages"
        seed = msg.metadata.get("delivery_id", "")
        for index in range(int(msg.metadata.get("parts_done", "0")), len(parts)):
            if parts[index].strip():
                await self._wait_for_bucket(path)
                payload: dict[str, Any] = {"content": parts[index], "allowed_mentions": {"parse": ["users"]}}
                if seed:  # a nonce is at most 25 characters
                    payload |= {"nonce": f"{seed}.{index}"[:25], "enforce_nonce": True}
                await self._request("POST", path, payload)
            msg.metadata["parts_done"] = str(index + 1)

    async def _wait_for_bucket(self, path: str) -> None:
        ready_at = self._ready_at.pop(path, 0.0)
        delay = ready_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # the bucket is empty until Discord's announced reset

    # ----------------------------------------------------------------------- receiving

    def _resume_point(self) -> ResumePoint | None:
        gateway = self._gateway
        if gateway is None or not gateway.session_id or gateway.seq is None:
            return None
        return ResumePoint(gateway.session_id, gateway.resume_url, gateway.seq)

    async def _on_dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Hand on a ``MESSAGE_CREATE`` no process took before (its id recorded first, with where
        the session stands, for the next leader)."""
        if event == "READY" and (resume := self._resume_point()) is not None:
            try:  # (a new session: the next leader resumes this one, not the one before)
                await self._inbound.fresh([], resume)
            except StorageError as exc:
                log.warning("discord: session not recorded (%s)", exc.message)
        if event != "MESSAGE_CREATE" or not self._from_allowed_human(data):
            return  # (before recording its id: our own replies come back here too)
        message_id = data.get("id")
        if isinstance(message_id, str) and message_id:
            try:
                if not await self._inbound.fresh([message_id], self._resume_point()):
                    return
            except StorageError as exc:  # (the Gateway will not send it again: handle it unrecorded)
                log.warning("discord: message id not recorded (%s)", exc.message)
        self._receive(data)

    def _from_allowed_human(self, data: dict[str, Any]) -> bool:
        """Not our own message nor another bot's, and from a sender ``allowFrom`` permits."""
        author = _author(data)
        author_id = str(author.get("id", ""))
        if author.get("bot") or author_id == self.user_id:
            return False
        # (before any download: a stranger's file is never fetched)
        return self._allow.permits(author_id, str(author.get("username", "")))

    def _receive(self, data: dict[str, Any]) -> None:
        """Turn a ``MESSAGE_CREATE`` from an allowed human into an InboundMessage; files go to the intake."""
        author = _author(data)
        author_id = str(author.get("id", ""))
        content = data.get("content")
        content = content if isinstance(content, str) else ""
        raw = data.get("attachments")
        attachments = [a for a in raw if isinstance(a, dict)] if isinstance(raw, list) else []
        if not (content or attachments) or "channel_id" not in data:
            return
        username = str(author.get("username", ""))
        metadata = {"message_id": str(data.get("id", "")), "username": username,
                    "guild_id": str(data.get("guild_id", ""))}  # fmt: skip
        base = InboundMessage(self.name, str(data["channel_id"]), content, author_id, metadata=metadata)
        if not attachments:
            self._files.publish(base)
            return
        files = [self._remote_file(a) for a in attachments]
        untrusted = next((f for f in files if origin(f.ref) not in self._trusted), None)
        if untrusted is not None:
            refused = f"{untrusted.name} is not hosted on Discord, and I only download files from Discord"
            self._files.refuse(base.chat_id, RequestError(refused))
            return
        self._files.accept(base, files, self._fetch)

    @staticmethod
    def _remote_file(attachment: dict[str, Any]) -> RemoteFile:
        size = attachment.get("size")
        return RemoteFile(str(attachment.get("filename") or "attachment"),
                          size if isinstance(size, int) and not isinstance(size, bool) else None,
                          str(attachment.get("url") or ""))  # fmt: skip

    async def _fetch(self, file: RemoteFile) -> bytes:
        """Download an attachment (no token sent: attachment URLs are signed), with the size cap."""
        if origin(file.ref) not in self._trusted:  # checked on receipt too; a fetch never trusts blindly
            raise RequestError(f"{file.name} is not hosted on Discord")
        if self._session is None:
            raise ChannelRetryableError("discord: channel is not started")
        limit = self._files.limits.attachments.max_file_bytes
        return await download(self._session, file.ref, file.name, limit)


def _author(data: dict[str, Any]) -> dict[str, Any]:
    author = data.get("author")
    return author if isinstance(author, dict) else {}
