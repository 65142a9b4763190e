"""The ``Channel`` interface every chat platform (and the HTTP API) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from nanobot.bus import OutboundMessage


class Channel(ABC):
    """A place people talk to the agent: ``start`` receiving, ``stop``, and ``send`` to it.

    ``durable`` channels (chat platforms) get every outbound message through the outbox,
    committed before the first attempt and retried; the ``api`` channel is not durable:
    its messages go straight to a waiting HTTP response.

    ``send`` raises :class:`~nanobot.errors.ChannelRetryableError` for failures worth
    retrying and :class:`~nanobot.errors.ChannelPermanentError` for the rest.
    """

    name: ClassVar[str]
    durable: ClassVar[bool] = True

    @property
    def leading(self) -> bool:
        """Whether this process receives the channel's messages. With several processes, one
        leads each channel that allows a single receiver (Telegram polling, Discord's Gateway)."""
        return True

    @abstractmethod
    async def start(self) -> None:
        """Begin receiving messages (returns once started; work continues in background tasks)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop receiving and release every resource; safe to call twice."""

    @abstractmethod
    async def send(self, msg: OutboundMessage) -> None:
        """Deliver one outbound message to the platform."""
