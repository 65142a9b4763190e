"""Three `nanobot serve` processes on one PostgreSQL (and one workspace) behave as one gateway:
one session hammered through all three, kill -9 mid-turn, and a rolling restart under load."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from cluster import ask, start, wait_ready, write_config
from served import Served, free_port

from fake_llm import FakeLLM, Step


@dataclass
class Cluster:
    """Three servers, each with its own config (port) and one shared workspace."""

    configs: list[Path]
    ports: list[int]
    servers: list[Served] = field(default_factory=list)
    stopped: list[Served] = field(default_factory=list)  # the servers restart replaced

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    async def restart(self, i: int) -> int:
        """SIGTERM server ``i``, wait for it to exit (its code), start it again, wait until ready."""
        old = self.servers[i]
        old.terminate()
        code = await old.exit_code(within=60)
        self.stopped.append(old)
        self.servers[i] = await start(self.configs[i], self.ports[i])
        await wait_ready(self.urls[i], within=90)
        return code


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, llm: str, storage: dict[str, Any], n: int = 3) -> AsyncIterator[Cluster]:
    """``n`` servers on one PostgreSQL and one workspace, all ready; killed on exit."""
    ports = [free_port() for _ in range(n)]
    configs = []
    for i, port in enumerate(ports):
        home = tmp_path / f"p{i}"
        home.mkdir()
        configs.append(write_config(home, llm, port, tmp_path / "ws", storage=storage))
    made = Cluster(configs, ports)
    try:
        made.servers = [await start(c, p) for c, p in zip(configs, ports, strict=True)]
        for url in made.urls:
            await wait_ready(url, within=90)
        yield made
    finally:
        for served in made.servers:
            if served.proc.returncode is None:
                served.proc.kill()
                await served.proc.wait()


async def stored_users(http: aiohttp.ClientSession, url: str, session_id: str) -> list[dict[str, Any]]:
    """The session's stored messages (GET /v1/sessions/{id})."""
    async with http.get(f"{url}/v1/sessions/{session_id}") as r:
        assert r.status == 200, await r.text()
        messages: list[dict[str, Any]] = (await r.json())["messages"]
        return messages


@dataclass(frozen=True)
class Done:
    text: str
    sent: float
    answered: float


@pytest.mark.timeout(180)
async def test_one_session_through_three_processes_keeps_every_turn_once_and_in_order(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """Turns sent to one session through three servers at once all land, once each, one after
    another: the model saw each turn with exactly the turns before it."""
    llm = fake_llm.url  # type: ignore[attr-defined]
    async with cluster(tmp_path, llm, {"url": pg_url}) as c, aiohttp.ClientSession() as http:
        done: list[Done] = []

        async def lane(i: int) -> None:
            for k in range(5):  # one after another on this lane: a client that waits for each answer
                text = f"lane {i} turn {k}"
                sent = time.monotonic()
                assert await ask(http, c.urls[i], "hammer", text) == f"echo: {text}"
                done.append(Done(text, sent, time.monotonic()))

        await asyncio.gather(*(lane(i) for i in range(3)))
        messages = await stored_users(http, c.urls[0], "hammer")
        users = [m["content"] for m in messages if m["role"] == "user"]
        assert sorted(users) == sorted(d.text for d in done) and len(set(users)) == 15
        assert [m["role"] for m in messages] == ["user", "assistant"] * 15
        # Consistent with completion: an answer received before another turn was sent comes first.
        where = {text: n for n, text in enumerate(users)}
        for a, b in itertools.permutations(done, 2):
            if a.answered < b.sent:
                assert where[a.text] < where[b.text], (a, b, users)
        # Serialised: turn n went upstream with exactly the n turns before it.
        history = [(m["role"], m["content"]) for m in messages]
        assert len(fake_llm.requests) == 15
        for n, request in enumerate(fake_llm.requests):
            sent_up = [(m["role"], m["content"]) for m in request["messages"] if m["role"] != "system"]
            assert sent_up == history[: 2 * n + 1], n


async def stream_text(http: aiohttp.ClientSession, url: str, session_id: str, text: str) -> str:
    """A streamed answer, its content deltas joined."""
    body = {"messages": [{"role": "user", "content": text}], "session_id": session_id, "stream": True}
    got = []
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.strip()
            if line.startswith(b"data: {"):
                choice = orjson.loads(line[6:])["choices"][0]
                got.append(choice["delta"].get("content") or "")
    return "".join(got)


async def requests_seen(fake_llm: FakeLLM, n: int) -> None:
    """Wait (deadline) until the fake upstream has received ``n`` requests."""
    async with asyncio.timeout(60):
        while len(fake_llm.requests) < n:  # noqa: ASYNC110 (other processes' progress, with a deadline)
            await asyncio.sleep(0.01)


@pytest.mark.timeout(180)
async def test_kill_9_mid_turn_leaves_other_sessions_alone_and_frees_its_own_after_the_lease(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """A server killed mid-turn: a stream on another server finishes; its session works again after
    storage.leaseSeconds, with no trace of the unfinished turn."""
    llm = fake_llm.url  # type: ignore[attr-defined]
    async with (
        cluster(tmp_path, llm, {"url": pg_url, "leaseSeconds": 1.0}) as c,
        aiohttp.ClientSession() as http,
    ):
        fake_llm.push(Step(stall=True))  # the doomed turn waits upstream until its server dies
        doomed = asyncio.create_task(ask(http, c.urls[0], "doomed", "never answered"))
        await requests_seen(fake_llm, 1)
        gate = asyncio.Event()
        fake_llm.push(Step(chunks=["part one, ", "part two"], gate=gate))
        streaming = asyncio.create_task(stream_text(http, c.urls[1], "other", "tell me"))
        await requests_seen(fake_llm, 2)  # both turns are running, on two servers
        os.kill(c.servers[0].proc.pid, signal.SIGKILL)
        await c.servers[0].proc.wait()
        gate.set()
        assert await streaming == "part one, part two"
        assert await ask(http, c.urls[2], "third", "still there?") == "echo: still there?"
        with pytest.raises(aiohttp.ClientError):
            await doomed
        # The doomed session waits for the dead holder's lease, then runs without its partial turn.
        assert await ask(http, c.urls[1], "doomed", "try again") == "echo: try again"
        sent = [m["content"] for m in fake_llm.requests[-1]["messages"] if m["role"] != "system"]
        assert sent == ["try again"]
        messages = await stored_users(http, c.urls[2], "doomed")
        assert [m["content"] for m in messages] == ["try again", "echo: try again"]


@dataclass
class Load:
    """Client lanes that go round the servers like a load balancer: a refused connection, a
    connection closed before any answer, or a 503 "shutting down" sends the turn to the next one."""

    urls: list[str]
    texts: dict[int, list[str]] = field(default_factory=dict)  # lane -> answered turns, in order
    failures: list[str] = field(default_factory=list)
    moved: int = 0  # turns sent on to the next server
    resets: int = 0  # of which: connections reset before any answer
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def lane(self, http: aiohttp.ClientSession, i: int) -> None:
        target = i % len(self.urls)
        done = self.texts.setdefault(i, [])
        for k in itertools.count():
            if self.stop.is_set():
                return
            text = f"lane {i} turn {k}"
            body = {"messages": [{"role": "user", "content": text}], "session_id": f"lane-{i}"}
            for _attempt in range(30):
                outcome = await self._post(http, self.urls[target], body)
                if outcome == "ok":
                    done.append(text)
                    break
                if outcome != "next":
                    self.failures.append(f"{text}: {outcome}")
                    return
                self.moved += 1
                target = (target + 1) % len(self.urls)
                if _attempt % len(self.urls) == len(self.urls) - 1:
                    await asyncio.sleep(0.1)  # every server refused: a load balancer's retry pause
            else:
                self.failures.append(f"{text}: no server took it")
                return

    async def _post(self, http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
        try:
            async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                text = await r.text()
                if r.status == 200:
                    return "ok"
                if r.status == 503 and "shutting down" in text:
                    return "next"
                return f"{r.status} {text[:200]}"
        except aiohttp.ClientConnectorError:
            return "next"  # refused: nothing listens there now
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # Reset before any answer: a connection still in the closing listener's queue, never
            # read. A load balancer sends it on; if it had run a turn, the exactly-once check
            # below would catch it.
            self.resets += 1
            return "next"


@pytest.mark.timeout(300)
async def test_a_rolling_restart_under_load_fails_no_request(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """SIGTERM and restart each of three servers in turn while clients keep sending: every turn is
    answered (the one in flight on a stopping server finishes), none runs twice, none is lost."""
    llm = fake_llm.url  # type: ignore[attr-defined]
    # Each answer takes a moment upstream, so turns are in flight when a server is told to stop.
    fake_llm.push(*(Step(text="ok", delay=0.05) for _ in range(5000)))
    async with (
        cluster(tmp_path, llm, {"url": pg_url}) as c,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
    ):
        load = Load(c.urls)
        lanes = [asyncio.create_task(load.lane(http, i)) for i in range(6)]
        try:
            await _progress(load, 12)
            for i in range(3):
                assert await c.restart(i) == 0, c.servers[i].log
                await _progress(load, sum(map(len, load.texts.values())) + 12)
        finally:
            load.stop.set()
            await asyncio.gather(*lanes)
        assert load.failures == []
        answered = 0
        for i, texts in load.texts.items():
            messages = await stored_users(http, c.urls[0], f"lane-{i}")
            assert [m["content"] for m in messages if m["role"] == "user"] == texts  # once each, in order
            answered += len(texts)
        assert len(fake_llm.requests) == answered  # no turn ran for a request that was moved on
        assert answered >= 48
        # The first server stopped with turns in flight (its two lanes never pause): they finished.
        assert "for 2 running requests" in c.stopped[0].log or "for 1 running requests" in c.stopped[0].log


async def _progress(load: Load, answered: int) -> None:
    """Wait (deadline) until the lanes have had ``answered`` turns answered in all."""
    async with asyncio.timeout(120):
        while sum(map(len, load.texts.values())) < answered and not load.failures:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert not load.failures, load.failures
