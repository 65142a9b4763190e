"""Server-sent events in OpenAI's chat-completion-chunk shape, serialised with minimal work per delta."""

from __future__ import annotations

import orjson

from nanobot.bus import Usage
from nanobot.errors import NanobotError
from nanobot.gateway.errors import error_body

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


class ChunkWriter:
    """Builds the SSE frames of one stream; the constant head of each chunk is encoded once."""

    __slots__ = ("_created", "_head", "_id", "_model")

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self._id = completion_id
        self._created = created
        self._model = model
        self._head = (
            b'data: {"id":'
            + orjson.dumps(completion_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"system_fingerprint":null,'
        )

    def role(self) -> bytes:
        """The first chunk: the assistant role with empty content."""
        return (
            self._head + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def content(self, piece: str) -> bytes:
        """One content delta."""
        return (
            self._head
            + b'"choices":[{"index":0,"delta":{"content":'
            + orjson.dumps(piece)
            + b'},"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def finish(self, reason: str) -> bytes:
        """The last choice chunk: an empty delta with the finish reason."""
        return (
            self._head
            + b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + orjson.dumps(reason)
            + b"}]}\n\n"
        )

    def usage(self, usage: Usage) -> bytes:
        """The ``stream_options.include_usage`` chunk: no choices, the turn's usage."""
        return self._head + b'"choices":[],"usage":' + orjson.dumps(usage.as_dict()) + b"}\n\n"


def error_event(exc: NanobotError) -> bytes:
    """A failure after the stream began: one error event (then the stream closes, no [DONE])."""
    return b"data: " + orjson.dumps(error_body(exc)) + b"\n\n"


def tool_event(event: dict[str, str]) -> bytes:
    """A ``nanobot.tool.progress`` event (only for streams that asked: the SDKs reject unknown events)."""
    return b"event: nanobot.tool.progress\ndata: " + orjson.dumps(event) + b"\n\n"
