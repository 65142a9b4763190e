"""The durable outbox and the manager: held, expired and resumed messages, receipts, the CLI."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from nanobot.bus import DeliveryReceipt, MessageBus, OutboundKind, OutboundMessage
from nanobot.channels.api import ApiChannel
from nanobot.config import Config
from nanobot.delivery.manager import APOLOGY, ChannelManager, build_channel_manager
from nanobot.delivery.outbox_cli import outbox_command
from nanobot.errors import ProviderError
from nanobot.storage.outbox import NewMessage, State
from nanobot.storage.sqlite.outbox import OutboxStore
from test_group_commit import wal_commits

from fake_platforms import Failure, FakeTelegram, make_config, running
from fake_platforms import outbox_entries as entries

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def fake() -> FakeTelegram:
    """A fresh fake Bot API."""
    return FakeTelegram()




def run_cli(config: Config, *argv: str, code: int) -> str:
    """Run `nanobot outbox ARGV`, check its exit code, return what it printed."""
    out = io.StringIO()
    assert outbox_command(config, list(argv), out) == code
    return out.getvalue()


def message(
    channel: str, text: str, chat: str = "9"
) -> tuple[OutboundMessage, asyncio.Future[DeliveryReceipt]]:
    """A `message`-tool send and its receipt."""
    receipt: asyncio.Future[DeliveryReceipt] = asyncio.get_running_loop().create_future()
    return OutboundMessage(channel, chat, text, OutboundKind.MESSAGE, receipt=receipt), receipt


async def test_disabled_channel_holds_and_never_sends(
    fake: FakeTelegram, telegram_url: str, tmp_path: Path
) -> None:
    """A message for a channel that is not enabled is held, never sent, and the tool is told so."""
    config = make_config(tmp_path)  # telegram not enabled, though its fake is up
    bus = MessageBus()
    async with running(config, bus) as manager:
        msg, receipt = message("telegram", "later")
        bus.publish_outbound(msg)
        assert await receipt == DeliveryReceipt("queued", "channel telegram is not enabled")
        await manager.wait_idle()
    assert fake.send_calls == 0
    assert entries(config) == [(1, State.HELD, "later")]


async def test_unknown_channel_is_queued(tmp_path: Path) -> None:
    """A channel nanobot has never heard of is reported as not enabled, not an error."""
    bus = MessageBus()
    async with running(make_config(tmp_path), bus):
        msg, receipt = message("slack", "hi")
        bus.publish_outbound(msg)
        assert await receipt == DeliveryReceipt("queued", "channel slack is not enabled")


async def test_held_message_is_delivered_once_channel_is_enabled(
    fake: FakeTelegram, telegram_url: str, tmp_path: Path
) -> None:
    """Held messages go out, in order, when their channel is enabled at the next start."""
    bus = MessageBus()
    async with running(make_config(tmp_path), bus) as manager:
        for text in ("one", "two"):
            bus.publish_outbound(OutboundMessage("telegram", "9", text))
        await manager.wait_idle()
    assert fake.send_calls == 0
    async with running(make_config(tmp_path, telegram=telegram_url)) as manager:
        await manager.wait_idle()
    assert fake.texts("9") == ["one", "two"]
    assert [state for _, state, _ in entries(make_config(tmp_path))] == [State.DELIVERED] * 2


async def test_old_held_message_expires(fake: FakeTelegram, telegram_url: str, tmp_path: Path) -> None:
    """A held message older than heldMaxAgeSeconds is expired, not sent, when its channel returns."""
    async with running(make_config(tmp_path)) as manager:
        manager.dispatch(OutboundMessage("telegram", "9", "stale news"))
        await manager.wait_idle()
    config = make_config(tmp_path, telegram=telegram_url, heldMaxAgeSeconds=0)
    async with running(config) as manager:
        await manager.wait_idle()
    assert fake.send_calls == 0
    assert entries(config) == [(1, State.EXPIRED, "stale news")]


async def test_pending_work_resumes_after_restart(
    fake: FakeTelegram, telegram_url: str, tmp_path: Path
) -> None:
    """Messages committed but not delivered when the process died are delivered at the next start."""
    config = make_config(tmp_path, telegram=telegram_url)
    store = OutboxStore(config.agents.defaults.workspace_path / "outbox.db")
    await store.open()
    await store.add([NewMessage("telegram", "9", "reply", f"left over {i}", {}) for i in range(3)])
    await store.close()
    async with running(config) as manager:
        await manager.wait_idle()
    assert fake.texts("9") == ["left over 0", "left over 1", "left over 2"]


async def test_failed_turn_becomes_an_apology(fake: FakeTelegram, telegram_url: str, tmp_path: Path) -> None:
    """An ERROR for a chat is sent as a short apology, never the internal error text."""
    bus = MessageBus()
    async with running(make_config(tmp_path, telegram=telegram_url), bus) as manager:
        error = ProviderError("upstream exploded: secret stack detail")
        bus.publish_outbound(OutboundMessage("telegram", "9", kind=OutboundKind.ERROR, error=error))
        await manager.wait_idle()
    assert fake.texts("9") == [APOLOGY]


async def test_deltas_are_not_sent_to_chats(fake: FakeTelegram, telegram_url: str, tmp_path: Path) -> None:
    """Streaming deltas never reach a chat platform; the final reply does."""
    bus = MessageBus()
    async with running(make_config(tmp_path, telegram=telegram_url), bus) as manager:
        bus.publish_outbound(OutboundMessage("telegram", "9", "Hel", OutboundKind.DELTA))
        bus.publish_outbound(OutboundMessage("telegram", "9", "Hello", OutboundKind.REPLY))
        await manager.wait_idle()
    assert fake.texts("9") == ["Hello"]


async def test_api_messages_take_the_fast_path(tmp_path: Path) -> None:
    """Messages for the api channel go straight to the waiting request, not the outbox."""
    bus = MessageBus()
    api = ApiChannel()
    manager = build_channel_manager(make_config(tmp_path), bus, api)
    await manager.start()
    task = asyncio.create_task(manager.run())
    try:
        reply = api.open("req-1", stream=True)
        bus.publish_outbound(OutboundMessage("api", "default", "hi", OutboundKind.DELTA, reply_to="req-1"))
        await asyncio.wait_for(reply.wait(), 5)
        assert reply.take() == ["hi"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await manager.stop()
    assert entries(make_config(tmp_path)) == []


async def test_outbox_file_is_wal_sqlite(tmp_path: Path) -> None:
    """The outbox is <workspace>/outbox.db in WAL mode."""
    async with running(make_config(tmp_path)):
        pass
    conn = sqlite3.connect(tmp_path / "outbox.db")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_cli_list_retry_drop(fake: FakeTelegram, telegram_url: str, tmp_path: Path) -> None:
    """`nanobot outbox` lists entries, retries a failed one, drops one, and reports bad ids."""
    config = make_config(tmp_path)
    async with running(config, MessageBus()) as manager:
        manager.dispatch(OutboundMessage("telegram", "9", "first held"))
        manager.dispatch(OutboundMessage("telegram", "9", "second held"))
        await manager.wait_idle()
    listing = run_cli(config, "list", code=0)
    assert "held" in listing and "first held" in listing and "second held" in listing
    assert run_cli(config, "drop", "2", code=0).strip() == "drop 2: dropped"
    assert run_cli(config, "retry", "1", code=0).strip() == (
        "retry 1: pending; it will be sent at the next start of nanobot serve"
    )
    run_cli(config, "drop", "2", code=1)
    run_cli(config, "retry", "x", code=2)
    run_cli(config, "frobnicate", code=2)
    assert entries(config) == [(1, State.PENDING, "first held")]
    async with running(make_config(tmp_path, telegram=telegram_url)) as manager:
        await manager.wait_idle()
    assert fake.texts("9") == ["first held"]
    assert run_cli(config, "list", code=0).strip() == "the outbox is empty"
    assert "delivered" in run_cli(config, "list", "--all", code=0)


async def test_cli_without_outbox_file(tmp_path: Path) -> None:
    """With no outbox yet, list says it is empty and retry reports not found."""
    config = make_config(tmp_path / "none")
    assert outbox_command(config, ["list"], io.StringIO()) == 0
    assert outbox_command(config, ["retry", "1"], io.StringIO()) == 1
    assert not (tmp_path / "none" / "outbox.db").exists()


async def test_store_batches_many_jobs_into_few_commits(tmp_path: Path) -> None:
    """A burst of inserts is committed in a few transactions (group commit); each entry gets its own id."""
    store = OutboxStore(tmp_path / "outbox.db")
    await store.open()
    before = wal_commits(tmp_path / "outbox.db-wal")
    batches = await asyncio.gather(
        *(store.add([NewMessage("telegram", "1", "reply", f"m{i}", {})]) for i in range(1000))
    )
    commits = wal_commits(tmp_path / "outbox.db-wal") - before
    await store.close()
    ids = [batch[0].id for batch in batches]
    assert ids == sorted(ids) and len(set(ids)) == 1000
    assert 1 <= commits <= 100, commits  # one commit per insert would be 1,000


async def test_clean_shutdown_stores_what_was_not_yet_stored(
    fake: FakeTelegram, telegram_url: str, tmp_path: Path
) -> None:
    """Messages still on the bus at shutdown are committed, then delivered after the restart."""
    config = make_config(tmp_path, telegram=telegram_url)
    bus = MessageBus()
    async with running(config, bus):
        msg, receipt = message("telegram", "last words")
        bus.publish_outbound(msg)  # the manager is stopped before it takes this in
    assert (await receipt).status == "queued"
    assert entries(config) == [(1, State.PENDING, "last words")]
    async with running(config) as manager:
        await manager.wait_idle()
    assert fake.texts("9") == ["last words"]


# --------------------------------------------------------------------------- hand edits, re-read


async def flushed(manager: ChannelManager) -> None:
    """Wait until the outbox has committed every write queued so far (its jobs run in order)."""
    await manager.store.add([])


async def test_reload_sends_a_message_retried_by_hand(
    fake: FakeTelegram, telegram_url: str, tmp_path: Path
) -> None:
    """A failed message retried with the CLI is sent by the running manager when it re-reads."""
    fake.failures.append(Failure(403, "Forbidden: bot was blocked by the user"))
    config = make_config(tmp_path, telegram=telegram_url)
    async with running(config) as manager:
        manager.dispatch(OutboundMessage("telegram", "9", "try again"))
        await manager.wait_idle()
        await flushed(manager)
        assert entries(config) == [(1, State.FAILED, "try again")]
        run_cli(config, "retry", "1", code=0)
        await manager.reload()
        await manager.wait_idle()
    assert fake.texts("9") == ["try again"]
    assert entries(config) == [(1, State.DELIVERED, "try again")]


async def test_reload_never_queues_an_in_flight_message_twice(
    fake: FakeTelegram, telegram_url: str, tmp_path: Path
) -> None:
    """A message mid-send when it is retried by hand and re-read is still sent exactly once."""
    fake.hold_after = 0  # the first send waits for release: the message is in flight
    config = make_config(tmp_path, telegram=telegram_url)
    async with running(config) as manager:
        manager.dispatch(OutboundMessage("telegram", "9", "once"))
        await fake.until(lambda: fake.parked == 1)
        run_cli(config, "retry", "1", code=0)
        await manager.reload()
        await manager.reload()
        fake.release.set()
        await manager.wait_idle()
    assert fake.send_calls == 1
    assert fake.texts("9") == ["once"]


async def test_reload_skips_a_waiting_message_dropped_by_hand(
    fake: FakeTelegram, telegram_url: str, tmp_path: Path
) -> None:
    """A message waiting out an hour's retry_after, dropped by hand, is never sent; its chat moves on."""
    fake.failures.append(Failure(429, "Too Many Requests", retry_after=3600))
    config = make_config(tmp_path, telegram=telegram_url)
    bus = MessageBus()
    async with running(config, bus) as manager:
        msg, receipt = message("telegram", "unwanted")
        bus.publish_outbound(msg)
        assert (await receipt).status == "queued"  # the 429 came back: it waits for an hour
        bus.publish_outbound(OutboundMessage("telegram", "9", "wanted"))
        run_cli(config, "drop", "1", code=0)
        await manager.reload()
        await manager.wait_idle()
    assert fake.texts("9") == ["wanted"]
    assert entries(config) == [(2, State.DELIVERED, "wanted")]


async def test_reload_wakes_a_waiting_message_retried_by_hand(
    fake: FakeTelegram, telegram_url: str, tmp_path: Path
) -> None:
    """A message waiting out an hour's retry_after, retried by hand, is sent as soon as it is re-read."""
    fake.failures.append(Failure(429, "Too Many Requests", retry_after=3600))
    config = make_config(tmp_path, telegram=telegram_url)
    bus = MessageBus()
    async with running(config, bus) as manager:
        msg, receipt = message("telegram", "now please")
        bus.publish_outbound(msg)
        assert (await receipt).status == "queued"
        await flushed(manager)  # the 429's backoff is on disk before the hand edit
        run_cli(config, "retry", "1", code=0)
        await manager.reload()
        await manager.wait_idle()
    assert fake.texts("9") == ["now please"]
