"""The message bus: queues when nobody routes, direct dispatch when a router is attached."""

from __future__ import annotations

from nanobot.bus import InboundMessage, MessageBus, OutboundMessage


async def test_messages_queue_until_consumed() -> None:
    """Without a handler, published messages wait in order on their queue."""
    bus = MessageBus()
    bus.publish_inbound(InboundMessage("api", "a", "one"))
    bus.publish_inbound(InboundMessage("api", "a", "two"))
    assert [(await bus.consume_inbound()).content for _ in range(2)] == ["one", "two"]


async def test_attached_handler_gets_queued_then_new_messages_in_order() -> None:
    """Attaching a handler hands it what was queued first, then each new message as published."""
    bus = MessageBus()
    seen: list[str] = []
    bus.publish_outbound(OutboundMessage("api", "a", "early"))
    bus.attach_outbound(lambda m: seen.append(m.content))
    assert seen == ["early"]
    bus.publish_outbound(OutboundMessage("api", "a", "late"))
    assert seen == ["early", "late"]
    bus.attach_outbound(None)
    bus.publish_outbound(OutboundMessage("api", "a", "queued again"))
    assert seen == ["early", "late"]
    assert bus.drain_outbound()[0].content == "queued again"


async def test_inbound_handler_routes_directly() -> None:
    """An attached inbound handler sees messages the moment they are published."""
    bus = MessageBus()
    seen: list[str] = []
    bus.attach_inbound(lambda m: seen.append(m.chat_id))
    bus.publish_inbound(InboundMessage("telegram", "42", "hi"))
    assert seen == ["42"]
