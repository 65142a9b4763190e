"""SIGTERM on a real `nanobot serve`: running requests get the grace period, then a clean 503."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson

from served import Served, serve

from fake_llm import FakeLLM, Step


def _body(session: str, *, stream: bool = False) -> dict[str, object]:
    return {"stream": stream, "session_id": session, "messages": [{"role": "user", "content": "hi"}]}


async def _open_stream(s: aiohttp.ClientSession, gw: Served, session: str) -> aiohttp.ClientResponse:
    """A stream whose turn is running: its first delta has arrived."""
    resp = await s.post(f"{gw.url}/v1/chat/completions", json=_body(session, stream=True))
    assert resp.status == 200
    while b'"first"' not in await resp.content.readline():
        pass
    return resp


async def test_requests_running_past_the_grace_get_503(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """On SIGTERM, requests still running after api.shutdownGrace get a 503 with Retry-After (JSON)
    or an SSE error event (stream) instead of a bare disconnect, and their turns are cancelled."""
    fake_llm.push(Step(stall=True), Step(chunks=["first", "never"], gate=asyncio.Event()))
    url = fake_llm.url  # type: ignore[attr-defined]
    async with serve(tmp_path, url, {"shutdownGrace": 0.3}) as gw, aiohttp.ClientSession() as s:
        plain = asyncio.create_task(s.post(f"{gw.url}/v1/chat/completions", json=_body("plain")))
        while not fake_llm.requests:
            await fake_llm.received.wait()
            fake_llm.received.clear()
        stream = await _open_stream(s, gw, "streamed")
        gw.terminate()
        resp = await asyncio.wait_for(plain, 15)
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        error = (await resp.json())["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error"
        rest = await asyncio.wait_for(stream.read(), 15)
        events = [
            orjson.loads(e.strip()[6:]) for e in rest.split(b"\n\n") if e.strip().startswith(b"data: {")
        ]
        assert events[-1]["error"]["code"] == "shutting_down"
        assert b"[DONE]" not in rest
        await asyncio.wait_for(fake_llm.cancelled.wait(), 10)  # the turns' upstream calls stopped
        assert await gw.exit_code() == 0
        assert "Traceback" not in gw.log
        assert "2 requests still running after 0.3 s were answered 503" in gw.log


async def test_new_requests_during_shutdown_get_503_and_running_ones_finish(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    """While a SIGTERM'd server waits for running requests, new ones get 503 at once, and a running
    stream that finishes within api.shutdownGrace is answered in full."""
    gate = asyncio.Event()
    fake_llm.push(Step(chunks=["first", " and last"], gate=gate))
    url = fake_llm.url  # type: ignore[attr-defined]
    async with serve(tmp_path, url, {"shutdownGrace": 30}) as gw, aiohttp.ClientSession() as s:
        stream = await _open_stream(s, gw, "running")
        gw.terminate()
        await gw.wait_log("shutting down: waiting up to 30 s for 1 running requests")
        async with s.post(f"{gw.url}/v1/chat/completions", json=_body("late")) as late:
            assert late.status == 503 and late.headers["Retry-After"] == "1"
            assert (await late.json())["error"]["code"] == "shutting_down"
        gate.set()
        rest = await asyncio.wait_for(stream.read(), 15)
        assert b'" and last"' in rest and rest.endswith(b"data: [DONE]\n\n")
        assert await gw.exit_code() == 0
        assert len(fake_llm.requests) == 1  # the late request started no turn
