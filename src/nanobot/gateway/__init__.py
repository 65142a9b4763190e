"""The HTTP side: an aiohttp app that translates OpenAI requests to bus messages and back."""

from nanobot.gateway.app import create_app

__all__ = ["create_app"]
