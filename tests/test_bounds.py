"""Resource bounds: idle sockets, slow stream readers, concurrent turns, the session cache."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import openai
import orjson
import pytest

from nanobot.config import parse_config
from nanobot.errors import ConfigError
from nanobot.storage.sessions import SessionStore
from served import serve

from fake_llm import FakeLLM, Step

StartGateway = Callable[..., Awaitable[str]]
# An upstream answer far bigger than every buffer between it and a reader (20 MB of deltas).
FLOOD = ["x" * 1000] * 20_000


def _chat_request(session: str, stream: bool, *, host: str) -> bytes:
    body = orjson.dumps(
        {"stream": stream, "session_id": session, "messages": [{"role": "user", "content": "go"}]}
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _host_header(gateway: str) -> str:
    """The Host a real client sends to the gateway (name and port: the server checks it)."""
    host, port = _host_port(gateway)
    return f"{host}:{port}"


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head, await reader.readexactly(length)


async def test_connections_without_a_request_head_are_closed(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """Sockets that send nothing, or half a request head, are closed after api.headerTimeout; others work."""
    async with serve(tmp_path, fake_llm.url, {"headerTimeout": 0.2}) as gw:  # type: ignore[attr-defined]
        silent = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(20)]
        half_reader, half_writer = await asyncio.open_connection("127.0.0.1", gw.port)
        half_writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        async with asyncio.timeout(10):
            for reader, _writer in silent:
                assert await _read_until_closed(reader) == b""
            assert await _read_until_closed(half_reader) == b""
        async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/health") as r:
            assert r.status == 200
        for _reader, writer in [*silent, (half_reader, half_writer)]:
            writer.close()


async def test_idle_keep_alive_connection_is_closed(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """A keep-alive connection is reused, and closed once left idle for api.idleTimeout."""
    async with serve(tmp_path, fake_llm.url, {"idleTimeout": 0.3}) as gw:  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        for _ in range(2):  # the connection is reused: it stays open while requests keep coming
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, body = await _read_response(reader)
            assert head.startswith(b"HTTP/1.1 200") and orjson.loads(body) == {"status": "ok"}
        async with asyncio.timeout(10):
            assert await _read_until_closed(reader) == b""
        writer.close()


async def test_warns_near_the_open_file_limit(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """When open connections near the process's file limit, one WARNING line says so."""
    limit = 128
    api = {"headerTimeout": 60}
    async with serve(tmp_path, fake_llm.url, api, file_limit=limit) as gw:  # type: ignore[attr-defined]
        conns = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(int(limit * 0.85))]
        line = await gw.wait_log("nearing the open-file limit")
        assert "WARNING" in line and f"of {limit} file descriptors" in line
        for _reader, writer in conns:
            writer.close()


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


async def _stalled_reader(gateway: str, session: str) -> socket.socket:
    """A client that asks for a stream and then never reads (a tiny receive buffer fills at once)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, _host_port(gateway))
    await loop.sock_sendall(sock, _chat_request(session, stream=True, host=_host_header(gateway)))
    return sock


async def _assert_no_earlier_turn(gateway: str, fake_llm: FakeLLM, session: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0) as client:
        resp = await client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "again"}],
            extra_body={"session_id": session},
        )
    assert resp.choices[0].message.content == "echo: again"
    assert [m["role"] for m in fake_llm.requests[-1]["messages"]] == ["system", "user"]


async def test_stalled_stream_reader_is_cut_and_its_turn_cancelled(
    start_gateway: StartGateway, fake_llm: FakeLLM
) -> None:
    """A stream client that stops reading pauses the upstream, is cut after api.streamStallTimeout, and
    its turn is cancelled: nothing is saved, the gateway does not buffer the whole answer."""
    gateway = await start_gateway({"api": {"streamStallTimeout": 0.3}})
    fake_llm.push(Step(chunks=FLOOD))
    sock = await _stalled_reader(gateway, "stalled")
    # The upstream is still sending when the turn is cancelled: it never got to send its 20 MB.
    await asyncio.wait_for(fake_llm.cancelled.wait(), 20)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):  # and the reader was disconnected
        with pytest.raises(ConnectionResetError):
            while await loop.sock_recv(sock, 65536):
                pass
            raise ConnectionResetError  # a clean EOF is as good as a reset
    sock.close()
    await _assert_no_earlier_turn(gateway, fake_llm, "stalled")


async def test_disconnected_slow_reader_cancels_its_turn(
    start_gateway: StartGateway, fake_llm: FakeLLM
) -> None:
    """A slow stream client that hangs up mid-answer cancels the turn, even when the upstream is fast."""
    gateway = await start_gateway()
    fake_llm.push(Step(chunks=FLOOD))
    reader, writer = await asyncio.open_connection(*_host_port(gateway), limit=4096)
    writer.write(_chat_request("hung-up", stream=True, host=_host_header(gateway)))
    got = 0
    while got < 1_000_000:  # a slow reader: 16 KiB at a time, then it gives up
        got += len(await reader.read(16384))
        await asyncio.sleep(0.002)  # the client's reading pace, not a wait for work
    writer.close()
    await asyncio.wait_for(fake_llm.cancelled.wait(), 20)
    await _assert_no_earlier_turn(gateway, fake_llm, "hung-up")


async def test_concurrent_turn_cap_answers_429(start_gateway: StartGateway, fake_llm: FakeLLM) -> None:
    """Past api.maxConcurrentTurns a request gets 429 with Retry-After at once (even before its body),
    and once turns finish, requests are served again."""
    gateway = await start_gateway({"api": {"maxConcurrentTurns": 2}})
    gates = [asyncio.Event(), asyncio.Event()]
    fake_llm.push(*(Step(chunks=["first", " second"], gate=g) for g in gates))
    async with (
        aiohttp.ClientSession() as s,
        openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0) as client,
    ):
        held = []
        for i in range(2):
            body = {"stream": True, "session_id": f"held{i}", "messages": [{"role": "user", "content": "x"}]}
            resp = await s.post(f"{gateway}/v1/chat/completions", json=body)
            while b'"first"' not in await resp.content.readline():  # the turn is running
                pass
            held.append(resp)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "y"}]
            )
        assert refused.value.response.headers["retry-after"] == "1"
        assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
        # a huge body is not waited for: the head alone gets the 429
        reader, writer = await asyncio.open_connection(*_host_port(gateway))
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {_host_header(gateway)}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 60000000\r\n\r\n{"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in head
        writer.close()
        assert len(fake_llm.requests) == 2  # no turn started for either
        for gate, resp in zip(gates, held, strict=True):
            gate.set()
            assert b"data: [DONE]" in await resp.read()
            resp.release()
        answer = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "z"}]
        )
        assert answer.choices[0].message.content == "echo: z"


async def test_session_cache_is_bounded_by_bytes(tmp_path: Path) -> None:
    """Many sessions with big messages keep the history cache under sessionCacheBytes; evicted
    sessions (and one bigger than the whole cache) are read back from disk intact."""
    bound = 50_000
    store = await SessionStore.open(tmp_path, cache_bytes=bound)
    try:
        for i in range(40):
            key = f"api:s{i}"
            async with store.lock(key):
                await store.history(key)
                await store.append_turn(
                    key,
                    [
                        {"role": "user", "content": f"q{i} " + "u" * 4000},
                        {"role": "assistant", "content": f"a{i}"},
                    ],
                )
            assert 0 < store.cache_bytes <= bound
        huge = "h" * (bound * 2)
        async with store.lock("api:huge"):
            await store.append_turn("api:huge", [{"role": "user", "content": huge}])
        for i in range(40):
            key = f"api:s{i}"
            async with store.lock(key):
                history = await store.history(key)
                assert [m["content"].split(" ")[0] for m in history] == [f"q{i}", f"a{i}"]
                await store.append_turn(
                    key, [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]
                )
            assert store.cache_bytes <= bound
        assert [m["content"] for m in await store.history("api:huge")] == [huge]
        assert store.cache_bytes <= bound
        assert len(await store.history("api:s0")) == 4
    finally:
        await store.close()


@pytest.mark.parametrize("key", ["maxConcurrentTurns", "headerTimeout", "idleTimeout", "streamStallTimeout"])
def test_bounds_must_be_positive(key: str) -> None:
    """A zero bound (which would refuse every request or close every connection) is a config error."""
    with pytest.raises(ConfigError, match=f"api.{key}: must be greater than 0"):
        parse_config({"api": {key: 0}})
