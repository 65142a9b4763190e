"""The aiohttp application: routes, the one middleware (errors, request ids, browser rules,
auth), the request observer (metrics, access log), and secret redaction for the app's lifetime."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from nanobot.attachments import AttachmentLimits
from nanobot.bus import MessageBus
from nanobot.channels.api import ApiChannel
from nanobot.config import Config
from nanobot.errors import NotFoundError
from nanobot.gateway.browser import BrowserPolicy, add_cors_headers
from nanobot.gateway.completions import chat_completions
from nanobot.gateway.errors import HTTP_LOG, ONE_LINE_BAD_REQUESTS, make_middleware
from nanobot.gateway.observe import metrics_endpoint, observer_args, readiness_endpoint
from nanobot.gateway.sessions_api import add_session_routes
from nanobot.gateway.state import STATE, GatewayState
from nanobot.gateway.webchat import add_web_chat
from nanobot.health import Readiness
from nanobot.metrics import Family, Metrics
from nanobot.redact import config_secrets, secrets_redacted

_HEALTH = orjson.dumps({"status": "ok"})


async def health(request: web.Request) -> web.Response:
    """``GET /health``: the process is up and answering."""
    return web.Response(body=_HEALTH, content_type="application/json")


def _model_object(state: GatewayState) -> dict[str, object]:
    return {"id": state.model, "object": "model", "created": state.created, "owned_by": "nanobot"}


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the one model this gateway serves."""
    body = {"object": "list", "data": [_model_object(request.app[STATE])]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: the served model, or a 404 for any other id."""
    state = request.app[STATE]
    wanted = request.match_info["model"]
    if wanted != state.model:
        raise NotFoundError(
            f"The model {wanted!r} does not exist here; this server serves {state.model!r}.",
            param="model",
            code="model_not_found",
        )
    return web.Response(body=orjson.dumps(_model_object(state)), content_type="application/json")


def _gateway_families(api: ApiChannel, readiness: Readiness) -> tuple[Family, ...]:
    """What the gateway itself reports, read when scraped."""
    return (
        Family("nanobot_open_streams", "Streaming chat requests in progress.", lambda: api.open_streams),
        Family(
            "nanobot_ready",
            "1 when GET /health/ready answers 200.",
            lambda: int(readiness.status() == "ready"),
        ),
        Family(
            "nanobot_storage_errors_total",
            "Storage transactions that failed, by store.",
            lambda: {s.name: s.errors for s in readiness.stores},
            label="store",
            kind="counter",
        ),
    )


def create_app(config: Config, bus: MessageBus, api: ApiChannel) -> web.Application:
    """Build the gateway app over ``bus``; the ``api`` channel routes replies back to requests."""
    policy = BrowserPolicy.from_config(config.api, config.channels.webhook_routes)
    HTTP_LOG.addFilter(ONE_LINE_BAD_REQUESTS)  # idempotent: the same filter object
    metrics = Metrics()
    readiness = Readiness()
    observing = observer_args(metrics, count=config.api.metrics, access_log=config.api.access_log)
    # api.maxRequestBytes bounds a JSON body here; multipart bodies are counted part by part.
    app = web.Application(
        middlewares=[make_middleware(config.api.api_key, policy)],
        client_max_size=config.api.max_request_bytes,
        # aiohttp's connection handler logs malformed requests through this logger; the
        # observer counts (and logs) every answered request, whichever runner serves the app.
        handler_args={"logger": HTTP_LOG, **observing},
    )
    if policy.cors_origins:  # only then can a response need CORS headers
        app.on_response_prepare.append(add_cors_headers)
    secrets = config_secrets(config)

    async def redaction(_app: web.Application) -> AsyncIterator[None]:
        # First in, last out: every log line of the app's life is redacted.
        with secrets_redacted(secrets):
            yield

    app.cleanup_ctx.append(redaction)
    app[STATE] = GatewayState(
        config=config,
        bus=bus,
        api=api,
        limits=AttachmentLimits.from_api(config.api),
        created=int(time.time()),
        metrics=metrics,
        readiness=readiness,
        model=config.model,
        model_json=orjson.dumps(config.model),
    )
    app.router.add_get("/health", health)
    app.router.add_get("/health/ready", readiness_endpoint)
    if config.api.metrics:
        app.router.add_get("/metrics", metrics_endpoint)
        metrics.watch(*_gateway_families(api, readiness))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    add_session_routes(app)
    if config.api.web_chat:
        add_web_chat(app)
    return app
