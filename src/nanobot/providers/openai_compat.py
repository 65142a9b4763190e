"""An OpenAI-compatible chat-completions client on one pooled aiohttp session.

Streams with SSE when the caller wants deltas, assembles tool-call deltas, captures
usage, and retries connection errors, 429 and 5xx with backoff (the server's
``Retry-After`` overriding it) — but only while nothing of that call has been relayed.
Every failure leaves as :class:`ProviderError` (502), :class:`ProviderTimeoutError` (504)
or, when the prompt does not fit the model, :class:`ContextLengthError` (400); each names
the URL called (without secrets) and what came back. ``should_retry`` on the error tells
the API's clients whether retrying can help: not after a permanent refusal, nor once this
client has already retried a server error.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson
from yarl import URL

from nanobot.config import ProviderConfig, safe_url
from nanobot.errors import ContextLengthError, ProviderError, ProviderTimeoutError
from nanobot.providers.base import LLMResponse, ToolCall, parse_usage
from nanobot.providers.sse import DeltaCallback, StreamReader
from nanobot.providers.upstream import (
    api_error_message,
    bad_completion,
    context_length_error,
    excerpt,
    is_context_length,
    status_error,
)

Sleep = Callable[[float], Awaitable[object]]
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
_LATER_STATUSES = frozenset({429, 503})  # "come back later": a client may retry after Retry-After
_MAX_WAIT = 60.0  # a Retry-After longer than this is not waited for here (nor by the OpenAI SDKs)
_ERROR_BODY_BYTES = 64 * 1024
_MIN_SECRET = 6


class _Retryable(Exception):
    """An attempt failed in a way worth retrying; ``retry_after`` is the server's hint."""

    def __init__(self, error: ProviderError, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAICompatProvider:
    """Chat completions against one OpenAI-compatible endpoint.

    ``sleep`` is the clock seam of the retry backoff (tests pass one that records).
    """

    def __init__(self, config: ProviderConfig, *, model: str, sleep: Sleep = asyncio.sleep) -> None:
        self._config = config
        self._model = model
        self._sleep = sleep
        self._url = config.api_base.rstrip("/") + "/chat/completions"
        self._target = URL(self._url)  # parsed once: a str would be parsed again on every call
        self._public_url = safe_url(self._url)
        self._cap = config.max_response_bytes
        self._headers = {"Content-Type": "application/json", **config.extra_headers}
        if config.api_key:
            self._headers["Authorization"] = f"Bearer {config.api_key}"
        # An upstream may quote the key it was sent: never pass that on. (Short header values
        # such as a team name are no secret, and replacing them would garble the text.)
        self._secrets = tuple(
            s.encode() for s in (config.api_key, *config.extra_headers.values()) if len(s) >= _MIN_SECRET
        )
        self._session: aiohttp.ClientSession | None = None
        self._tools: Sequence[dict[str, Any]] = ()  # the last tool definitions serialised, and their JSON
        self._tools_fragment = orjson.Fragment(b"[]")

    def _tools_json(self, tools: Sequence[dict[str, Any]]) -> orjson.Fragment | Sequence[dict[str, Any]]:
        """The tool definitions, serialised once while the caller passes the same tuple (the
        registry keeps one per channel until its tools change): re-serialising ~3 KB of schemas
        on every call cost ~7k instructions. Anything but a tuple is serialised as it is."""
        if type(tools) is not tuple:
            return tools
        if tools is not self._tools:
            self._tools = tools  # (held: its id cannot be reused while it is cached)
            self._tools_fragment = orjson.Fragment(orjson.dumps(tools))
        return self._tools_fragment

    def __repr__(self) -> str:
        return f"OpenAICompatProvider(url={self._public_url!r}, model={self._model!r})"

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
        response_format: dict[str, Any] | None = None,
    ) -> LLMResponse:
        """One chat-completions call; with ``on_delta`` it streams and relays text as it arrives."""
        body: dict[str, Any] = {"model": self._model, "messages": messages}
        if tools:
            body["tools"] = self._tools_json(tools)
        if response_format is not None:
            body["response_format"] = response_format  # structured output, as the client asked
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
            reader = StreamReader(on_delta, self._public_url, self._cap) if on_delta is not None else None
            try:
                return await self._attempt(payload, reader)
            except _Retryable as exc:
                attempt += 1
                hint = exc.retry_after
                if (
                    (reader is not None and reader.relayed)  # a retry would repeat relayed text
                    or attempt > self._config.max_retries
                    or (hint is not None and hint > _MAX_WAIT)
                ):
                    raise self._exhausted(exc, attempt) from exc
                await self._sleep(self._backoff(attempt, hint))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after  # the server knows best (at most _MAX_WAIT: see chat)
        base: float = self._config.retry_base_seconds * 2.0 ** (attempt - 1)
        return min(base, 30.0) * (0.5 + random.random() / 2)

    @staticmethod
    def _exhausted(exc: _Retryable, attempt: int) -> ProviderError:
        """The error once retrying is over, telling the API's clients whether to try again."""
        err = exc.error
        hint = exc.retry_after
        if exc.status in _LATER_STATUSES:
            # Capacity comes back with time: worth a later try, unless the wait is past any client's patience.
            err.should_retry = hint is None or hint <= _MAX_WAIT
            err.retry_after = hint
        elif attempt > 1:
            # Already retried here: a client retrying too only multiplies the upstream calls.
            err.should_retry = False
        if attempt > 1:
            err.message = f"{err.message} (gave up after {attempt} tries)"
            err.args = (err.message,)
        return err

    async def _attempt(self, payload: bytes, reader: StreamReader | None) -> LLMResponse:
        session = self._session
        if session is None:
            raise ProviderError("provider is not started")
        url = self._public_url
        try:
            async with session.post(self._target, data=payload, headers=self._headers) as resp:
                if resp.status != 200:
                    raise await self._refusal(resp)
                if reader is None:
                    length = resp.content_length
                    if length is not None and length <= self._cap:  # the usual case: one read
                        return self._completion(await resp.read(), resp)
                    return self._completion(await self._read_body(resp), resp)
                if resp.content_type in ("application/json", "text/html"):
                    # Not an event stream (a server ignoring `stream`, or a proxy's page).
                    answer = self._completion(await self._read_body(resp), resp)
                    return await reader.relay_whole(answer)
                return await reader.read(resp.content)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            if reader is not None and reader.relayed:
                raise ProviderError(f"upstream LLM at {url} closed the connection mid-answer") from exc
            raise _Retryable(ProviderError(f"cannot reach upstream LLM at {url}: {_safe(exc)}")) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            cfg = self._config
            raise ProviderTimeoutError(
                f"upstream LLM at {url} timed out (connectTimeout {cfg.connect_timeout:g} s, "
                f"readTimeout {cfg.read_timeout:g} s)"
            ) from exc
        except aiohttp.ClientError as exc:
            raise ProviderError(f"upstream LLM request to {url} failed: {_safe(exc)}") from exc

    async def _refusal(self, resp: aiohttp.ClientResponse) -> Exception:
        """The exception for a non-200 answer: retryable, or final with ``should_retry`` false."""
        status = resp.status
        body = self._redact(await _read_head(resp, _ERROR_BODY_BYTES))
        err = status_error(self._public_url, status, body, resp.content_type)
        if isinstance(err, ContextLengthError):
            return err
        if status in _RETRY_STATUSES:
            return _Retryable(err, status, _retry_after(resp.headers))
        err.should_retry = False  # 400/401/403/404/422...: the same request fails the same way
        return err

    def _redact(self, body: bytes) -> bytes:
        for secret in self._secrets:
            body = body.replace(secret, b"[redacted]")
        return body

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, at most ``maxResponseBytes``."""
        length = resp.content_length
        if length is not None and length <= self._cap:
            return await resp.read()
        body = await _read_head(resp, self._cap + 1)
        if len(body) > self._cap:
            raise ProviderError(
                f"upstream LLM at {self._public_url} sent more than {self._cap} bytes "
                "(providers.*.maxResponseBytes)"
            )
        return body

    def _completion(self, raw: bytes, resp: aiohttp.ClientResponse) -> LLMResponse:
        """The parsed answer; ``resp``'s content type is read only to describe a bad one."""
        url = self._public_url
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise bad_completion(url, self._redact(raw), resp.content_type, "not JSON") from exc
        if not isinstance(data, dict):
            raise bad_completion(url, self._redact(raw), resp.content_type, "not a JSON object")
        if "error" in data:  # some proxies answer 200 with an error body
            redacted = self._redact(raw)
            message = api_error_message(orjson.loads(redacted)) or redacted.decode("utf-8", "replace")
            if is_context_length(message):
                raise context_length_error(url, "HTTP 200", message)
            raise ProviderError(f"upstream LLM at {url} answered HTTP 200 with an error: {excerpt(message)}")
        try:
            return _parse_completion(data)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise bad_completion(url, self._redact(raw), resp.content_type, "unexpected shape") from exc


async def _read_head(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body (an error page may be endless)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)


def _safe(exc: BaseException) -> str:
    # aiohttp's connection errors name host and port, never credentials; keep them short.
    return str(exc)[:200] or exc.__class__.__name__


def _parse_completion(data: dict[str, Any]) -> LLMResponse:
    """A parsed completion; no choices at all is an empty answer (the agent decides what that means)."""
    choices = data.get("choices")
    usage = parse_usage(data.get("usage"))
    if not choices:
        return LLMResponse(usage=usage)
    choice = choices[0]
    message = choice.get("message") or {}
    wanted = message.get("tool_calls")
    calls = _tool_calls(wanted) if wanted else ()
    # Positional: a class called with keywords builds a dict of them (~450 instructions each).
    return LLMResponse(
        message.get("content") or "",
        calls,
        choice.get("finish_reason") or ("tool_calls" if calls else "stop"),
        usage,
    )


def _tool_calls(calls: list[dict[str, Any]]) -> tuple[ToolCall, ...]:
    return tuple(
        ToolCall(
            str(c.get("id") or f"call_{i}"), c["function"]["name"], c["function"].get("arguments") or "{}"
        )
        for i, c in enumerate(calls)
    )
