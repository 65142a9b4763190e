"""An MCP tool call's result as the model sees it: text, a few bounded images, and whether it failed.

Text blocks are joined; embedded resources and resource links are described in text;
``structuredContent`` is sent as JSON only when the server gave no text (the spec asks
servers to send its JSON as text too, so it is not repeated). Images are checked by their
magic bytes (the declared type is not trusted), and bounded in number and size: an image
past a bound is replaced by a note, so the model knows it was there. The registry bounds the
text's length.
"""

from __future__ import annotations

import base64
import binascii

import mcp.types as mcp_types
import orjson

from nanobot.bus import ImageInput
from nanobot.redact import redact
from nanobot.tools.base import ToolResult

MAX_IMAGES = 4  # per result
MAX_IMAGE_BYTES = 5 * 1024 * 1024  # decoded, per image: what the common vision models accept
_MAGIC_B64_CHARS = 24  # 18 bytes: enough for every magic number below
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def convert(result: mcp_types.CallToolResult, server: str, tool: str) -> ToolResult:
    """``result`` as a :class:`ToolResult`; ``isError`` makes it an error for the model."""
    parts: list[str] = []
    images: list[ImageInput] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.ImageContent):
            _add_image(block, images, parts, f"{server}-{tool}-{len(images) + 1}")
        elif isinstance(block, mcp_types.EmbeddedResource):
            parts.append(_resource(block.resource))
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource link: {block.name} <{block.uri}>]")
        elif isinstance(block, mcp_types.AudioContent):
            parts.append(f"[audio omitted ({block.mime_type}): the model here takes no audio]")
        else:  # a block type from a newer protocol revision
            parts.append(f"[{getattr(block, 'type', 'unknown')} content omitted]")
    if result.structured_content is not None and not any(
        isinstance(b, mcp_types.TextContent) for b in result.content
    ):
        parts.append(orjson.dumps(result.structured_content).decode())
    text = "\n".join(p for p in parts if p)
    if result.is_error:  # an error text may quote a configured secret (a token the server refused)
        text = redact(text or "no details given")
        return ToolResult(f"Error: {tool} failed: {text}", tuple(images), is_error=True)
    if not text and not images:
        text = "(the tool returned nothing)"
    return ToolResult(text, tuple(images))


def _add_image(block: mcp_types.ImageContent, images: list[ImageInput], parts: list[str], name: str) -> None:
    data = block.data
    size = len(data) * 3 // 4  # decoded size, near enough (padding): no need to decode it all
    mime = _sniff(data)
    if mime is None:
        parts.append(f"[image omitted: not a PNG, JPEG, GIF or WebP image (declared {block.mime_type})]")
    elif size > MAX_IMAGE_BYTES:
        parts.append(f"[image omitted: {size:,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit]")
    elif len(images) >= MAX_IMAGES:
        parts.append(f"[image omitted: only {MAX_IMAGES} images per tool result are shown]")
    else:
        images.append(ImageInput(name, mime, data))
        parts.append(f"[image {len(images)}: {mime}, shown below]")


def _sniff(data_b64: str) -> str | None:
    """The image type from the first bytes of base64 ``data_b64``, or None when it is not one."""
    head_b64 = data_b64[:_MAGIC_B64_CHARS]
    try:
        head = base64.b64decode(head_b64 + "=" * (-len(head_b64) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    for magic, mime in _IMAGE_MAGIC:
        if head.startswith(magic):
            return mime
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _resource(resource: mcp_types.TextResourceContents | mcp_types.BlobResourceContents) -> str:
    if isinstance(resource, mcp_types.TextResourceContents):
        return f"[resource <{resource.uri}>]\n{resource.text}"
    size = len(resource.blob) * 3 // 4
    return (
        f"[binary resource <{resource.uri}> ({resource.mime_type or 'unknown type'}, {size:,} bytes) omitted]"
    )
