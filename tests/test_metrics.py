"""GET /metrics through the real gateway: counts move by exactly the requests made, histograms
add up, the gauges follow what is running, and the exposition parses as Prometheus text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from nanobot.gateway.worker_metrics import merge

from fake_llm import FakeLLM, Step
from fake_platforms import TELEGRAM_TOKEN, FakeTelegram

Start = Callable[..., Awaitable[str]]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One connection, so each request is answered (and counted) before the next is read."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        yield s


async def scrape(http: aiohttp.ClientSession, gw: str) -> dict[str, list[Sample]]:
    """Every sample of GET /metrics by sample name, as Prometheus's own parser reads it."""
    async with http.get(f"{gw}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await r.text()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [s.value for s in samples.get(name, []) if labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def requests_by_route(samples: dict[str, list[Sample]]) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in samples["nanobot_http_requests_total"]
    }


async def test_requests_are_counted_by_route_template_and_status(
    start_gateway: Start, fake_llm: FakeLLM, http: aiohttp.ClientSession
) -> None:
    """Each request counts once under its route's template (never the raw path, so ids and typos
    cannot blow up the series); unknown paths count as `other`."""
    gw = await start_gateway()
    for _ in range(2):
        async with http.get(f"{gw}/health") as r:
            assert r.status == 200
    async with http.get(f"{gw}/v1/models") as r:
        assert r.status == 200
    for _ in range(2):
        async with http.post(f"{gw}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
    async with http.post(f"{gw}/v1/chat/completions", json={"messages": []}) as r:
        assert r.status == 400
    for sid in ("one", "two"):
        async with http.get(f"{gw}/v1/sessions/{sid}") as r:
            assert r.status == 404
    for path in ("/no/such/path?token=x", "/v1/nope"):
        async with http.get(f"{gw}{path}") as r:
            assert r.status == 404
    async with http.delete(f"{gw}/v1/models") as r:
        assert r.status == 405

    samples = await scrape(http, gw)
    assert requests_by_route(samples) == {
        ("GET", "/health", "200"): 2,
        ("GET", "/v1/models", "200"): 1,
        ("POST", "/v1/chat/completions", "200"): 2,
        ("POST", "/v1/chat/completions", "400"): 1,
        ("GET", "/v1/sessions/{id}", "404"): 2,
        ("other", "other", "404"): 2,
        ("other", "other", "405"): 1,
    }
    assert value(samples, "nanobot_turn_duration_seconds_count", channel="api") == 2
    assert value(samples, "nanobot_upstream_request_duration_seconds_count", outcome="ok") == 2
    assert len(fake_llm.requests) == 2
    # The scrape itself is counted once it has been answered.
    again = requests_by_route(await scrape(http, gw))
    assert again[("GET", "/metrics", "200")] == 1


def check_histograms(samples: dict[str, list[Sample]], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Buckets cumulative and ending in +Inf == _count, _sum present; returns _count per label set."""
    counts = {_key(s.labels): s.value for s in samples[f"{name}_count"]}
    sums = {_key(s.labels): s.value for s in samples[f"{name}_sum"]}
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for s in samples[f"{name}_bucket"]:
        labels = dict(s.labels)
        le = float(labels.pop("le"))
        buckets.setdefault(_key(labels), []).append((le, s.value))
    assert counts and set(counts) == set(sums) == set(buckets)
    for key, series in buckets.items():
        bounds = [le for le, _ in series]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")
        cumulative = [n for _, n in series]
        assert cumulative == sorted(cumulative), (name, key, cumulative)
        assert cumulative[-1] == counts[key]
        assert sums[key] >= 0
    return counts


def _key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


async def test_histograms_are_consistent(
    start_gateway: Start, fake_llm: FakeLLM, http: aiohttp.ClientSession
) -> None:
    """Every histogram's buckets are cumulative, its +Inf bucket equals its _count, and the
    request histogram counts exactly the requests its route answered."""
    gw = await start_gateway()
    fake_llm.push(Step(status=400, error="no such thing"))
    for _ in range(3):
        async with http.get(f"{gw}/v1/models") as r:
            assert r.status == 200
    for _ in range(2):
        async with http.post(f"{gw}/v1/chat/completions", json=CHAT) as r:
            await r.read()
    samples = await scrape(http, gw)
    by_route = check_histograms(samples, "nanobot_http_request_duration_seconds")
    assert by_route[(("method", "GET"), ("route", "/v1/models"))] == 3
    assert by_route[(("method", "POST"), ("route", "/v1/chat/completions"))] == 2
    for (method, route, _status), n in requests_by_route(samples).items():
        assert n <= by_route[(("method", method), ("route", route))]
    assert check_histograms(samples, "nanobot_turn_duration_seconds") == {(("channel", "api"),): 2}
    upstream = check_histograms(samples, "nanobot_upstream_request_duration_seconds")
    assert upstream == {(("outcome", "error"),): 1, (("outcome", "ok"),): 1}


async def poll(http: aiohttp.ClientSession, gw: str, want: dict[str, float]) -> dict[str, list[Sample]]:
    """Scrape until the unlabelled gauges in ``want`` have those values (5 s at most)."""
    deadline = time.monotonic() + 5
    while True:
        samples = await scrape(http, gw)
        if all(value(samples, name) == v for name, v in want.items()) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.02)  # polling a gauge with a deadline


async def test_open_streams_and_running_turns_follow_a_gated_stream(
    start_gateway: Start, fake_llm: FakeLLM
) -> None:
    """While a stream is mid-answer /metrics shows one open stream and one running turn; both
    go back to 0 when it ends."""
    gw = await start_gateway()
    gate = asyncio.Event()
    fake_llm.push(Step(chunks=["first", " rest"], gate=gate))
    async with aiohttp.ClientSession() as s, aiohttp.ClientSession() as scraper:
        before = await scrape(scraper, gw)
        assert value(before, "nanobot_open_streams") == 0
        assert value(before, "nanobot_running_turns") == 0
        resp = await s.post(f"{gw}/v1/chat/completions", json={**CHAT, "stream": True})
        while b'"first"' not in await resp.content.readline():
            pass
        during = await scrape(scraper, gw)
        assert value(during, "nanobot_open_streams") == 1
        assert value(during, "nanobot_running_turns") == 1
        gate.set()
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        resp.release()
        after = await poll(scraper, gw, {"nanobot_open_streams": 0, "nanobot_running_turns": 0})
        assert value(after, "nanobot_open_streams") == 0
        assert value(after, "nanobot_running_turns") == 0


def _message_to(channel: str) -> list[Step]:
    return [Step(tool_calls=[("message", {"content": "hello", "channel": channel, "chat_id": "7"})]),
            Step(text="Sent.")]  # fmt: skip


async def test_outbox_depth_counts_held_messages(
    start_gateway: Start, fake_llm: FakeLLM, http: aiohttp.ClientSession
) -> None:
    """Messages held for a channel that is not enabled show up as outbox depth by state."""
    gw = await start_gateway()
    empty = await scrape(http, gw)
    for state in ("pending", "held", "failed", "expired"):
        assert value(empty, "nanobot_outbox_messages", state=state) == 0
    for _ in range(2):
        fake_llm.push(*_message_to("telegram"))
        async with http.post(f"{gw}/v1/chat/completions", json=CHAT) as r:
            assert (await r.json())["choices"][0]["message"]["content"] == "Sent."
    assert "queued" in fake_llm.requests[-1]["messages"][-1]["content"]  # the model was told: held
    samples = await scrape(http, gw)
    assert value(samples, "nanobot_outbox_messages", state="held") == 2
    assert value(samples, "nanobot_outbox_messages", state="pending") == 0
    assert value(samples, "nanobot_storage_errors_total", store="outbox") == 0
    assert value(samples, "nanobot_ready") == 1


@pytest.mark.parametrize(("token", "up"), [(TELEGRAM_TOKEN, 1), ("123456:a-token-it-refuses", 0)])
async def test_channel_up_and_leadership_are_reported(
    start_gateway: Start, http: aiohttp.ClientSession, aiohttp_server: Any, token: str, up: int
) -> None:
    """A configured channel is reported up (1) once its platform accepted it and down (0) when
    refused; this one process leads it either way (1)."""
    platform = FakeTelegram()
    server = await aiohttp_server(platform.app)
    telegram = {"enabled": True, "token": token, "apiBase": str(server.make_url("")).rstrip("/")}
    gw = await start_gateway({"channels": {"telegram": telegram}})
    samples = await scrape(http, gw)
    assert value(samples, "nanobot_channel_up", channel="telegram") == up
    assert value(samples, "nanobot_channel_leader", channel="telegram") == 1
    assert "discord" not in {s.labels["channel"] for s in samples["nanobot_channel_up"]}  # not configured


async def test_metrics_obey_the_host_rule_and_can_be_turned_off(
    start_gateway: Start, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """/metrics needs no key but refuses a rebinding Host (a web page cannot read it), and
    api.metrics false removes it."""
    gw = await start_gateway({"api": {"apiKey": "sk-client-key-123"}})
    async with http.get(f"{gw}/metrics") as r:
        assert r.status == 200  # no key needed: scrapers send none
    async with http.get(f"{gw}/metrics", headers={"Host": "evil.example"}) as r:
        assert r.status == 421
    async with http.get(f"{gw}/metrics", headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403
    other = {"defaults": {"workspace": str(tmp_path / "ws2")}}
    off = await start_gateway({"api": {"metrics": False}, "agents": other})
    async with http.get(f"{off}/metrics") as r:
        assert r.status == 404


def test_workers_numbers_are_added_up_as_each_metric_means() -> None:
    """Under --workers a scrape adds up every worker's exposition: counters, histograms and work
    in progress are summed; the shared outbox is reported once; up and ready are combined."""
    one = (
        b"# HELP nanobot_http_requests_total Requests.\n# TYPE nanobot_http_requests_total counter\n"
        b'nanobot_http_requests_total{method="GET",route="/health",status="200"} 3\n'
        b"# HELP nanobot_turn_duration_seconds Turns.\n# TYPE nanobot_turn_duration_seconds histogram\n"
        b'nanobot_turn_duration_seconds_bucket{channel="api",le="+Inf"} 2\n'
        b'nanobot_turn_duration_seconds_sum{channel="api"} 0.25\n'
        b"# HELP nanobot_open_streams Streams.\n# TYPE nanobot_open_streams gauge\nnanobot_open_streams 1\n"
        b"# HELP nanobot_outbox_messages Outbox.\n# TYPE nanobot_outbox_messages gauge\n"
        b'nanobot_outbox_messages{state="pending"} 7\n'
        b"# HELP nanobot_channel_up Up.\n# TYPE nanobot_channel_up gauge\n"
        b'nanobot_channel_up{channel="telegram"} 0\n'
        b"# HELP nanobot_ready Ready.\n# TYPE nanobot_ready gauge\nnanobot_ready 1\n"
    )
    two = (
        b"# HELP nanobot_http_requests_total Requests.\n# TYPE nanobot_http_requests_total counter\n"
        b'nanobot_http_requests_total{method="GET",route="/health",status="200"} 4\n'
        b'nanobot_http_requests_total{method="GET",route="/v1/models",status="200"} 1\n'
        b"# HELP nanobot_turn_duration_seconds Turns.\n# TYPE nanobot_turn_duration_seconds histogram\n"
        b'nanobot_turn_duration_seconds_bucket{channel="api",le="+Inf"} 5\n'
        b'nanobot_turn_duration_seconds_sum{channel="api"} 0.5\n'
        b"# HELP nanobot_open_streams Streams.\n# TYPE nanobot_open_streams gauge\nnanobot_open_streams 2\n"
        b"# HELP nanobot_outbox_messages Outbox.\n# TYPE nanobot_outbox_messages gauge\n"
        b'nanobot_outbox_messages{state="pending"} 7\n'
        b"# HELP nanobot_channel_up Up.\n# TYPE nanobot_channel_up gauge\n"
        b'nanobot_channel_up{channel="telegram"} 1\n'
        b"# HELP nanobot_ready Ready.\n# TYPE nanobot_ready gauge\nnanobot_ready 0\n"
    )
    merged = merge([one, two]).decode().splitlines()
    assert 'nanobot_http_requests_total{method="GET",route="/health",status="200"} 7' in merged
    assert 'nanobot_http_requests_total{method="GET",route="/v1/models",status="200"} 1' in merged
    assert 'nanobot_turn_duration_seconds_bucket{channel="api",le="+Inf"} 7' in merged
    assert 'nanobot_turn_duration_seconds_sum{channel="api"} 0.75' in merged
    assert "nanobot_open_streams 3" in merged
    assert 'nanobot_outbox_messages{state="pending"} 7' in merged  # (one shared outbox)
    assert 'nanobot_channel_up{channel="telegram"} 1' in merged  # (connected in one worker)
    assert "nanobot_ready 0" in merged  # (not every worker is ready)
    assert "nanobot_workers_answering 2" in merged
    assert merged.count("# TYPE nanobot_http_requests_total counter") == 1
    families = {f.name for f in text_string_to_metric_families("\n".join(merged))}  # (a valid exposition)
    assert {"nanobot_http_requests", "nanobot_turn_duration_seconds", "nanobot_workers_answering"} <= families
