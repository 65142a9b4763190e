"""Parse and validate a chat-completions request into a typed :class:`ChatRequest`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nanobot.attachments import decode_data_url
from nanobot.errors import RequestError
from nanobot.valueclass import valueclass

if TYPE_CHECKING:
    from nanobot.gateway.conversation import PastMessage

MAX_SESSION_ID = 128
_HISTORY_HINT = (
    "This server keeps the conversation history per session_id: send exactly one 'user' message "
    "(optionally after 'system'/'developer' messages) and pass session_id to continue a conversation. "
    "To send the whole conversation each time instead (chat UIs do), the server's config must set "
    'api.clientHistory to "accept".'
)


@dataclass(frozen=True, slots=True)
class FileInput:
    """A file found in the request, not yet sniffed: from a data URL or a multipart upload."""

    name: str | None
    data: bytes
    param: str


@valueclass  # one per request: see nanobot.valueclass
class ChatRequest:
    """One validated chat-completions request."""

    text: str
    session_id: str
    stream: bool
    include_usage: bool
    tool_events: bool  # stream_options.include_tool_events: nanobot.tool.progress events in the stream
    temperature: float | None = None
    max_tokens: int | None = None
    instructions: str = ""
    files: tuple[FileInput, ...] = ()
    # The conversation the client sent (api.clientHistory "accept"): the turn runs on it and
    # stores nothing. None: the server's session history is used.
    history: tuple[PastMessage, ...] | None = None
    use_tools: bool = True  # False for tool_choice "none"
    response_format: dict[str, Any] | None = None  # json_object / json_schema, for the upstream


def check_session_id(value: object, default: str = "default") -> str:
    """A valid session id: a string of 1-128 characters with no control characters; omitted → ``default``."""
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise RequestError("session_id must be a string", param="session_id")
    if len(value) > MAX_SESSION_ID:
        raise RequestError(f"session_id must be at most {MAX_SESSION_ID} characters", param="session_id")
    if not value.isprintable():
        raise RequestError("session_id must not contain control characters", param="session_id")
    return value


def check_model(value: object, model: str) -> None:
    """The model must be omitted or be the one this server lists."""
    if value is None or value == model:
        return
    raise RequestError(
        f"The model {value!r} is not served here; omit 'model' or use {model!r} (see GET /v1/models).",
        param="model",
        code="model_not_found",
    )


def text_of(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RequestError(f"{param}[{i}] must be a text part", param=param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"{param} must be a string or a list of text parts", param=param)


def user_content(content: object, param: str, max_file_bytes: int) -> tuple[str, tuple[FileInput, ...]]:
    # Data URLs are decoded here, while the body is parsed, so the base64 text (a third
    # larger than the file) is not kept alive for the rest of the request.
    if isinstance(content, str):
        return content, ()
    if not isinstance(content, list):
        raise RequestError(f"{param} must be a string or a list of content parts", param=param)
    texts: list[str] = []
    parts: list[FileInput] = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise RequestError(f"{where}.image_url.url must be a string", param=where)
            parts.append(
                FileInput(None, decode_data_url(url, param=where, max_bytes=max_file_bytes)[1], where)
            )
        elif kind == "file":
            file = part.get("file")
            data = file.get("file_data") if isinstance(file, dict) else None
            if not isinstance(data, str):
                raise RequestError(f"{where}.file.file_data must be a data URL string", param=where)
            name = file.get("filename") if isinstance(file, dict) else None
            label = name if isinstance(name, str) else None
            parts.append(
                FileInput(label, decode_data_url(data, param=where, max_bytes=max_file_bytes)[1], where)
            )
        else:
            raise RequestError(
                f"{where}: unsupported content part; use 'text', 'image_url' or 'file'", param=where
            )
    return "\n".join(texts), tuple(parts)


def _split_messages(messages: object) -> tuple[str, int, dict[str, Any]]:
    """The turn's extra instructions, and the user message with its index."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    instructions: list[str] = []
    user: dict[str, Any] | None = None
    index = 0
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(role, str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        if role in ("system", "developer") and user is None:
            instructions.append(text_of(m.get("content"), f"messages[{i}].content"))
        elif role == "user" and user is None:
            user, index = m, i
        else:
            raise RequestError(
                f"messages[{i}] ({role}) is not accepted. {_HISTORY_HINT}", param=f"messages[{i}]"
            )
    if user is None:
        raise RequestError(f"messages has no 'user' message. {_HISTORY_HINT}", param="messages")
    return ("\n\n".join(filter(None, instructions)) if instructions else ""), index, user


_OWN_TOOLS = (
    "This server runs its own tools (see its README); it does not take client-side tools. "
    "Remove '{field}' from the request (tool_choice 'auto' or 'none' is accepted)."
)


def _use_tools(body: dict[str, Any]) -> bool:
    """Whether the turn may use the server's tools; client-side tools are refused, not dropped:
    a model offered them could call one, and the client would never see the call."""
    tools = body.get("tools")
    if tools is not None and tools != []:
        raise RequestError(_OWN_TOOLS.format(field="tools"), param="tools")
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return True
    if choice == "none":
        return False
    raise RequestError(_OWN_TOOLS.format(field="tool_choice"), param="tools")


def _response_format(value: object) -> dict[str, Any] | None:
    """``response_format`` checked for shape (the upstream checks the schema itself)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(value, dict) or kind not in ("text", "json_object", "json_schema"):
        raise RequestError(
            "response_format must be an object whose type is 'text', 'json_object' or 'json_schema'",
            param="response_format",
        )
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise RequestError(
                "response_format.json_schema must be an object with a 'name' (and a 'schema')",
                param="response_format.json_schema",
            )
        if "schema" in spec and not isinstance(spec["schema"], dict):
            raise RequestError(
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format.json_schema.schema",
            )
    return value


def _temperature(value: object) -> float | None:
    """The client's temperature when it is a sensible value (anything else is ignored, as
    other OpenAI fields are: the configured default applies)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        return None
    return float(value)


def _max_tokens(body: dict[str, Any]) -> int | None:
    """The client's max_completion_tokens (or max_tokens) when it is a sensible value."""
    limit = body["max_completion_tokens"] if "max_completion_tokens" in body else body.get("max_tokens")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    return limit


def parse_chat_request(
    body: object,
    model: str,
    max_file_bytes: int,
    *,
    header_session: str | None = None,
    client_history: bool = False,
    max_files: int = 16,
) -> ChatRequest:
    """Validate a JSON chat-completions body; raise :class:`RequestError` naming what is wrong.

    ``header_session`` is the X-Session-Id header's id (already checked), used when the body
    names none; ``client_history`` is api.clientHistory "accept"."""
    # Runs for every request: absent fields (the usual case) are skipped without a call.
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    get = body.get
    if (wanted := get("model")) is not None:
        check_model(wanted, model)
    stream = get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", param="stream")
    include_usage = tool_events = False
    if isinstance(options := get("stream_options"), dict):
        include_usage = options.get("include_usage") is True
        tool_events = options.get("include_tool_events") is True
    temperature = None if (t := get("temperature")) is None else _temperature(t)
    max_tokens = _max_tokens(body) if "max_tokens" in body or "max_completion_tokens" in body else None
    use_tools = _use_tools(body) if "tools" in body or "tool_choice" in body else True
    response_format = None if (rf := get("response_format")) is None else _response_format(rf)
    given = get("session_id") or header_session  # the body's session_id wins
    session_id = check_session_id(get("session_id"), header_session or "default")
    messages = get("messages")
    if client_history and _resent(messages, given is not None):
        from nanobot.gateway.conversation import parse_conversation  # (only this mode needs it)

        conv = parse_conversation(messages, max_file_bytes, max_files)  # type: ignore[arg-type]
        text, instructions, files, history = conv.text, conv.instructions, conv.files, conv.history
    else:
        history = None  # the session's
        instructions, index, user = _split_messages(messages)
        content = user.get("content")
        if isinstance(content, str):
            text, files = content, ()
        else:  # content parts: texts, images, files
            text, files = user_content(content, f"messages[{index}].content", max_file_bytes)
        if not text.strip() and not files:
            raise RequestError("the user message is empty", param="messages")
    # Positional: a class called with keywords builds a dict of them (~450 instructions each).
    return ChatRequest(
        text,
        session_id,
        stream,
        include_usage,
        tool_events,
        temperature,
        max_tokens,
        instructions,
        files,
        history,
        use_tools,
        response_format,
    )


def _resent(messages: object, session_given: bool) -> bool:
    """Whether ``messages`` is a conversation to run as sent (api.clientHistory "accept"): more
    than one non-instruction message, or any request that names no session (a chat UI's first
    message must not continue the shared ``default`` session of every other client)."""
    if not isinstance(messages, list) or not messages:
        return False
    if not session_given:
        return True
    said = [m for m in messages if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))]
    return len(said) > 1
