"""An OpenAI-compatible chat-completions client on one pooled aiohttp session.

Streams with SSE when the caller wants deltas, assembles tool-call deltas, captures
usage, and retries connection errors, 429 and 5xx with backoff (the server's
``Retry-After`` overriding it) — but only while nothing of that call has been relayed.
Every failure leaves as :class:`ProviderError` (502) or :class:`ProviderTimeoutError` (504).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson

from nanobot.bus import Usage
from nanobot.config import ProviderConfig
from nanobot.errors import ProviderError, ProviderTimeoutError
from nanobot.providers.base import LLMResponse, ToolCall

# Called with each piece of text as it arrives. It may return an awaitable: the stream is not
# read further until it resolves (back-pressure from a slow client to the upstream read).
DeltaCallback = Callable[[str], Awaitable[None] | None]
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})


class _Retryable(Exception):
    """An attempt failed in a way worth retrying; ``retry_after`` is the server's hint."""

    def __init__(self, error: ProviderError, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


def _usage(data: object) -> Usage:
    if not isinstance(data, dict):
        return Usage()
    p = int(data.get("prompt_tokens") or 0)
    c = int(data.get("completion_tokens") or 0)
    return Usage(p, c, int(data.get("total_tokens") or p + c))


def _error_message(status: int, body: bytes) -> str:
    detail = body[:500].decode("utf-8", "replace").strip()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            detail = err["message"]
        elif isinstance(err, str):
            detail = err
    return (
        f"upstream LLM returned HTTP {status}: {detail}" if detail else f"upstream LLM returned HTTP {status}"
    )


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAICompatProvider:
    """Chat completions against one OpenAI-compatible endpoint."""

    def __init__(self, config: ProviderConfig, *, model: str) -> None:
        self._config = config
        self._model = model
        self._url = config.api_base.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", **config.extra_headers}
        if config.api_key:
            self._headers["Authorization"] = f"Bearer {config.api_key}"
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAICompatProvider(url={self._url!r}, model={self._model!r})"

    async def start(self) -> None:
        """Open the pooled HTTP session (one for the process's lifetime)."""
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._config.connect_timeout, sock_read=self._config.read_timeout
        )
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        # No cookies: an API client has no use for them, and the jar costs time on every call.
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        """Close the pooled session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
        on_delta: DeltaCallback | None = None,
    ) -> LLMResponse:
        """One chat-completions call; with ``on_delta`` it streams and relays text as it arrives."""
        body: dict[str, Any] = {"model": self._model, "messages": messages}
        if tools:
            body["tools"] = tools
        if max_tokens:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if on_delta is not None:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        payload = orjson.dumps(body)
        attempt = 0
        while True:
            relayed = [False]
            try:
                return await self._attempt(payload, on_delta, relayed)
            except _Retryable as exc:
                attempt += 1
                if relayed[0] or attempt > self._config.max_retries:
                    raise exc.error from exc
                await asyncio.sleep(self._backoff(attempt, exc.retry_after))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, 60.0)
        base: float = self._config.retry_base_seconds * 2.0 ** (attempt - 1)
        return min(base, 30.0) * (0.5 + random.random() / 2)

    async def _attempt(
        self, payload: bytes, on_delta: DeltaCallback | None, relayed: list[bool]
    ) -> LLMResponse:
        session = self._session
        if session is None:
            raise ProviderError("provider is not started")
        try:
            async with session.post(self._url, data=payload, headers=self._headers) as resp:
                if resp.status != 200:
                    err = ProviderError(_error_message(resp.status, await resp.read()))
                    if resp.status in _RETRY_STATUSES:
                        raise _Retryable(err, _retry_after(resp.headers))
                    raise err
                if on_delta is None:
                    return _parse_completion(await resp.read())
                return await _read_stream(resp, on_delta, relayed)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            if relayed[0]:
                raise ProviderError(
                    f"upstream LLM connection lost mid-stream: {exc.__class__.__name__}"
                ) from exc
            raise _Retryable(ProviderError(f"cannot reach upstream LLM: {_safe(exc)}")) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise ProviderTimeoutError("upstream LLM timed out") from exc
        except aiohttp.ClientError as exc:
            raise ProviderError(f"upstream LLM request failed: {exc.__class__.__name__}") from exc


def _safe(exc: BaseException) -> str:
    # aiohttp's connection errors name host and port, never credentials; keep them short.
    return str(exc)[:200] or exc.__class__.__name__


def _parse_completion(raw: bytes) -> LLMResponse:
    try:
        data = orjson.loads(raw)
        choice = data["choices"][0]
        message = choice.get("message") or {}
        calls = tuple(
            ToolCall(
                str(c.get("id") or f"call_{i}"), c["function"]["name"], c["function"].get("arguments") or "{}"
            )
            for i, c in enumerate(message.get("tool_calls") or ())
        )
        return LLMResponse(
            content=message.get("content") or "",
            tool_calls=calls,
            finish_reason=choice.get("finish_reason") or ("tool_calls" if calls else "stop"),
            usage=_usage(data.get("usage")),
        )
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ProviderError("upstream LLM returned a malformed completion") from exc


class _ToolCallParts:
    __slots__ = ("args", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.args: list[str] = []


async def _read_stream(
    resp: aiohttp.ClientResponse, on_delta: DeltaCallback, relayed: list[bool]
) -> LLMResponse:
    text: list[str] = []
    calls: dict[int, _ToolCallParts] = {}
    finish = "stop"
    usage = Usage()
    done = finished = False
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue  # comments, event names, blank separators
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProviderError("upstream LLM sent a malformed stream chunk") from exc
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:
            raise ProviderError(_error_message(502, data))
        if chunk.get("usage"):
            usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            piece = delta.get("content")
            if piece:
                text.append(piece)
                relayed[0] = True
                pending = on_delta(piece)
                if pending is not None:
                    await pending
            for tc in delta.get("tool_calls") or ():
                parts = calls.setdefault(int(tc.get("index", 0)), _ToolCallParts())
                parts.id = tc.get("id") or parts.id
                fn = tc.get("function") or {}
                parts.name = fn.get("name") or parts.name
                if fn.get("arguments"):
                    parts.args.append(fn["arguments"])
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
                finished = True
    if not (done or finished):
        raise ProviderError("upstream LLM closed the stream before it finished")
    tool_calls = tuple(
        ToolCall(p.id or f"call_{i}", p.name, "".join(p.args) or "{}") for i, p in sorted(calls.items())
    )
    return LLMResponse("".join(text), tool_calls, finish, usage)
