"""Chat channels: the ``Channel`` interface, the manager that dispatches to them, and the adapters."""

from nanobot.channels.base import Channel

__all__ = ["Channel"]
