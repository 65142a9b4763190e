"""Chat channels: the ``Channel`` interface and the adapters (delivery lives in :mod:`nanobot.delivery`)."""

from nanobot.channels.base import Channel

__all__ = ["Channel"]
