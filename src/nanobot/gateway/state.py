"""What the gateway's handlers share, held in one typed app key."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from nanobot.attachments import AttachmentLimits
from nanobot.bus import MessageBus
from nanobot.channels.api import ApiChannel
from nanobot.config import Config
from nanobot.health import Readiness
from nanobot.metrics import Metrics


@dataclass(frozen=True, slots=True)
class GatewayState:
    """The bus and the ``api`` channel the handlers talk to, the settings they apply, and what
    ``/metrics`` and ``/health/ready`` report."""

    config: Config
    bus: MessageBus
    api: ApiChannel
    limits: AttachmentLimits
    created: int
    metrics: Metrics
    readiness: Readiness
    model: str  # the one model served (config.model, read on every request)
    model_json: bytes  # the same as a JSON string, for the answers written without a dict


STATE = web.AppKey("nanobot.gateway", GatewayState)
