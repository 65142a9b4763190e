"""The Discord Gateway websocket client: receive events, stay connected, resume after drops.

One connection's life: HELLO (op 10) gives the heartbeat interval; we heartbeat (op 1
with the last sequence number) and expect an ACK (op 11) before the next one — no ACK
means a zombie connection, closed and resumed. A new session IDENTIFYs (op 2, with the
token and intents); a known one RESUMEs (op 6, session id + sequence) at the
``resume_gateway_url`` READY gave. The server may ask us to RECONNECT (op 7, resume) or
say the session is INVALID (op 9: resume if ``d`` is true, else identify afresh after
1 to 5 s). Close codes that mean the configuration is wrong (bad token, bad intents) stop
the connection for good, with one error line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from nanobot.config import DiscordConfig

log = logging.getLogger(__name__)

# Awaited before the next frame is read: events reach the handler in order.
DispatchHandler = Callable[[str, dict[str, Any]], Awaitable[None]]

INVALID_SESSION_WAIT = (1.0, 5.0)  # seconds, as Discord asks before identifying again
HELLO_TIMEOUT = 30.0
_FATAL_CLOSE = {
    4004: "authentication failed (check channels.discord.token)",
    4010: "invalid shard",
    4011: "sharding required",
    4012: "invalid API version",
    4013: "invalid intents (check channels.discord.intents)",
    4014: "disallowed intents: enable the Message Content intent for the bot in the Developer Portal",
}
_NEW_SESSION_CLOSE = {4007, 4009}  # invalid sequence, session timed out: identify again
_DATA = (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY)
_RESUMABLE_CLOSE = 4000  # we close with a non-1000 code so the session stays resumable


class GatewayFatalError(Exception):
    """The Gateway refused us for a reason reconnecting cannot fix."""


class DiscordGateway:
    """A self-healing Gateway connection that hands every dispatch event to ``on_dispatch``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: DiscordConfig,
        on_dispatch: DispatchHandler,
        *,
        hand_over: bool = False,
    ) -> None:
        self._session = session
        # Stopped (cancelled), close so that the session stays resumable: the next leader, or
        # this process after a restart, resumes it and Discord replays what it sent meanwhile.
        # (Else a clean close, which ends it.)
        self._hand_over = hand_over
        self._config = config
        self._on_dispatch = on_dispatch
        self._acked = True
        self.session_id = ""
        self.seq: int | None = None
        self.resume_url = ""
        self.user_id = ""

    def __repr__(self) -> str:
        return f"DiscordGateway(session_id={self.session_id!r}, seq={self.seq!r})"

    async def run(self) -> None:
        """Connect, and reconnect (resuming when possible) until cancelled or refused for good."""
        failures = 0
        while True:
            try:
                healthy = await self._connect()
            except GatewayFatalError as exc:
                log.error("discord: gateway refused the connection: %s; not reconnecting", exc)
                return
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                healthy = False
                log.warning("discord: gateway connection failed: %s: %s", type(exc).__name__, exc)
            failures = 0 if healthy else failures + 1
            if failures:
                await asyncio.sleep(min(60.0, 2.0 ** (failures - 1)) * random.uniform(0.5, 1.0))

    def _url(self) -> str:
        if not (self.session_id and self.resume_url):
            return self._config.gateway_url
        # resume_gateway_url has no query: Discord asks us to add the original one (v, encoding).
        resume = urlsplit(self.resume_url)
        query = resume.query or urlsplit(self._config.gateway_url).query
        return urlunsplit((resume.scheme, resume.netloc, resume.path or "/", query, ""))

    async def _connect(self) -> bool:
        """One connection, until it ends; True when it got as far as a session (READY/RESUMED)."""
        async with self._session.ws_connect(self._url(), autoping=True, max_msg_size=0) as ws:
            hello = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT)
            if hello.type not in _DATA or orjson.loads(hello.data).get("op") != 10:
                raise ValueError(f"expected HELLO, got a {hello.type.name} frame")
            interval = float(orjson.loads(hello.data)["d"]["heartbeat_interval"]) / 1000
            self._acked = True
            beat = asyncio.create_task(self._heartbeat(ws, interval))
            try:
                await ws.send_bytes(orjson.dumps(self._resume() if self.session_id else self._identify()))
                return await self._listen(ws)
            except asyncio.CancelledError:
                if self._hand_over:
                    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                        await asyncio.wait_for(ws.close(code=_RESUMABLE_CLOSE), HELLO_TIMEOUT)
                raise
            finally:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)

    def _identify(self) -> dict[str, Any]:
        props = {"os": "linux", "browser": "nanobot", "device": "nanobot"}
        data = {"token": self._config.token, "intents": self._config.intents, "properties": props}
        return {"op": 2, "d": data}

    def _resume(self) -> dict[str, Any]:
        return {"op": 6, "d": {"token": self._config.token, "session_id": self.session_id, "seq": self.seq}}

    async def _heartbeat(self, ws: aiohttp.ClientWebSocketResponse, interval: float) -> None:
        await asyncio.sleep(interval * random.random())  # jitter, as Discord asks
        while True:
            if not self._acked:
                log.warning("discord: no heartbeat ACK; reconnecting")
                await ws.close(code=_RESUMABLE_CLOSE)
                return
            self._acked = False
            await ws.send_bytes(orjson.dumps({"op": 1, "d": self.seq}))
            await asyncio.sleep(interval)

    async def _listen(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Handle frames until the connection ends; True if a session was established."""
        established = False
        async for frame in ws:
            if frame.type not in _DATA:
                continue
            payload = orjson.loads(frame.data)
            op = payload.get("op")
            if op == 0:
                established |= await self._dispatch(payload)
            elif op == 1:
                await ws.send_bytes(orjson.dumps({"op": 1, "d": self.seq}))
            elif op == 11:
                self._acked = True
            elif op == 7:
                log.info("discord: gateway asked us to reconnect")
                await ws.close(code=_RESUMABLE_CLOSE)
                return True
            elif op == 9:
                await self._invalid_session(ws, bool(payload.get("d")))
                return True
        self._closed(ws.close_code)
        return established

    async def _dispatch(self, payload: dict[str, Any]) -> bool:
        if isinstance(payload.get("s"), int):
            self.seq = payload["s"]
        event, data = str(payload.get("t")), payload.get("d")
        if not isinstance(data, dict):
            return False
        if event == "READY":
            self.session_id = str(data.get("session_id", ""))
            self.resume_url = str(data.get("resume_gateway_url", ""))
            self.user_id = str((data.get("user") or {}).get("id", ""))
            log.info("discord: gateway ready")
        elif event == "RESUMED":
            log.info("discord: gateway session resumed at seq %s", self.seq)
        await self._on_dispatch(event, data)
        return event in ("READY", "RESUMED")

    async def _invalid_session(self, ws: aiohttp.ClientWebSocketResponse, resumable: bool) -> None:
        log.info("discord: gateway session invalidated (resumable=%s)", resumable)
        if not resumable:
            self.session_id, self.seq = "", None
        await ws.close(code=_RESUMABLE_CLOSE)
        await asyncio.sleep(random.uniform(*INVALID_SESSION_WAIT))

    def _closed(self, code: int | None) -> None:
        """Decide what a server close means: stop for good, identify afresh, or resume."""
        if code in _FATAL_CLOSE:
            raise GatewayFatalError(f"close code {code}: {_FATAL_CLOSE[code]}")
        if code in _NEW_SESSION_CLOSE:
            self.session_id, self.seq = "", None
        log.info("discord: gateway connection closed (code %s); reconnecting", code)
