"""The nanobot exception tree.

Every expected failure is one of these; third-party errors are translated at the
boundary where they happen (``raise ... from exc``). The gateway maps them to OpenAI
error bodies in one middleware; the CLI maps them to one line and an exit code.

    NanobotError                    base; ``status``, ``type``, ``code``, ``param``
    ├── ConfigError                 a bad config file or value (CLI exit 2)
    ├── StorageError                a database is unusable: at start (CLI exit 2), mid-request (503)
    │   └── LeaseLostError          a turn's session lease passed to another holder (503, retry)
    ├── RequestError                the client's request is malformed (400)
    │   ├── AuthenticationError     missing or wrong API key (401)
    │   ├── NotFoundError           unknown route (404)
    │   ├── MethodNotAllowedError   wrong HTTP method (405)
    │   ├── PayloadTooLargeError    a file or the body is over its limit (413)
    │   ├── UnsupportedMediaError   content type or file type not supported (415)
    │   ├── ForbiddenError          a browser origin or Host that is not allowed (403)
    │   ├── MisdirectedError        a Host this server does not answer for (421)
    │   ├── ContextLengthError      the conversation no longer fits the model (400)
    │   └── RateLimitError          too many turns at once (429, ``retry_after``)
    ├── ServiceUnavailableError     shutting down (503, ``retry_after``)
    ├── AttachmentError             an upload could not be read (422)
    ├── ProviderError               the upstream LLM failed (502)
    │   └── ProviderTimeoutError    the upstream LLM or the turn timed out (504)
    ├── ChannelError                a chat platform refused or failed a delivery
    │   ├── ChannelRetryableError   try again later (``retry_after`` seconds, if known)
    │   └── ChannelPermanentError   never retry this message
    └── TurnTimeoutError            the whole request exceeded ``api.timeout`` (504)
"""

from __future__ import annotations


class NanobotError(Exception):
    """Base of every expected nanobot failure; carries its OpenAI error shape."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    # Sent as ``x-should-retry`` (the OpenAI SDKs honour it) when not None; ``retry_after``
    # (seconds) as ``Retry-After``. Instances may override both.
    should_retry: bool | None = None
    retry_after: float | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after


class ConfigError(NanobotError):
    """The configuration file or a value in it is invalid."""

    status = 500
    code = "config_error"


class StorageError(NanobotError):
    """The workspace, or a database in it, cannot be opened, locked, read or written.

    At start-up it ends the process (one line, exit 2); during a request it is a 503 with
    ``Retry-After``: the server is alive, its storage is not (``/health/ready`` says so too).
    """

    status = 503
    code = "storage_error"
    retry_after = 1.0


class LeaseLostError(StorageError):
    """A turn held its session's lease past its expiry and another holder took it: the turn
    is not saved (fencing), so it can never write over a newer one (503, as StorageError)."""

    code = "session_busy"
    should_retry = True


class RequestError(NanobotError):
    """The client's request is malformed."""

    status = 400
    type = "invalid_request_error"


class AuthenticationError(RequestError):
    """Missing or wrong ``Authorization: Bearer`` key."""

    status = 401
    code = "invalid_api_key"


class NotFoundError(RequestError):
    """No route matches the request path."""

    status = 404
    code = "not_found"


class MethodNotAllowedError(RequestError):
    """The route exists but not for this method."""

    status = 405
    code = "method_not_allowed"


class PayloadTooLargeError(RequestError):
    """A file or the whole request body is over its limit."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaError(RequestError):
    """The request's content type, or an uploaded file's type, is not supported."""

    status = 415
    code = "unsupported_media_type"


class ForbiddenError(RequestError):
    """A request from a browser origin, or with a ``Sec-Fetch-Site``, that is not allowed."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class MisdirectedError(RequestError):
    """The ``Host`` header names a host this server does not answer for (DNS rebinding)."""

    status = 421
    code = "misdirected_request"


class ContextLengthError(RequestError):
    """The conversation no longer fits the model's context, even with old turns dropped."""

    code = "context_length_exceeded"
    should_retry = False


class RateLimitError(RequestError):
    """Too many turns are running; try again after ``retry_after`` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retry_after = 1.0


class ServiceUnavailableError(NanobotError):
    """The server is shutting down; try again (elsewhere) after ``retry_after`` seconds."""

    status = 503
    type = "server_error"
    code = "shutting_down"
    retry_after = 1.0


class AttachmentError(NanobotError):
    """An uploaded file is corrupt, encrypted or otherwise unreadable."""

    status = 422
    type = "invalid_request_error"
    code = "unreadable_file"


class ProviderError(NanobotError):
    """The upstream LLM failed or answered with an error."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class ProviderTimeoutError(ProviderError):
    """The upstream LLM did not answer in time."""

    status = 504
    code = "upstream_timeout"


class TurnTimeoutError(NanobotError):
    """The whole request took longer than ``api.timeout``."""

    status = 504
    type = "timeout_error"
    code = "timeout"


class ChannelError(NanobotError):
    """A chat platform refused or failed a delivery."""

    status = 502
    type = "channel_error"


class ChannelRetryableError(ChannelError):
    """A delivery failure worth retrying (429, 5xx, network); ``retry_after`` when the platform said."""


class ChannelPermanentError(ChannelError):
    """A delivery failure that retrying cannot fix (400, 401, 403)."""
