"""``prepare_file``: one uploaded file in, model input out (an image part or extracted text)."""

from __future__ import annotations

import asyncio
import base64

from nanobot.attachments.collect import cap_text
from nanobot.attachments.jobs import ExtractRequest
from nanobot.attachments.model import AttachmentLimits, PreparedFile
from nanobot.attachments.names import sanitize_name
from nanobot.attachments.sniff import (
    SUPPORTED_TYPES,
    decode_text,
    describe_binary,
    is_encrypted_office,
    sniff,
)
from nanobot.attachments.workers import get_pool
from nanobot.bus import ImageInput
from nanobot.errors import AttachmentError, PayloadTooLargeError, RequestError, UnsupportedMediaError


async def prepare_file(name: str | None, data: bytes, limits: AttachmentLimits) -> PreparedFile:
    """Turn one upload into a :class:`PreparedFile`, deciding its type from its bytes alone.

    Raises ``RequestError`` (empty file), ``PayloadTooLargeError`` (over
    ``max_file_bytes``), ``UnsupportedMediaError`` (a type we do not read) or
    ``AttachmentError`` (corrupt, encrypted, a zip bomb, over the page cap, or slower
    than ``extract_timeout``), each naming the file. Documents are parsed in a worker
    process; images are only checked by their magic bytes, never decoded.
    """
    display = sanitize_name(name)
    if not data:
        raise RequestError(f"{display} is empty")
    if len(data) > limits.max_file_bytes:
        raise PayloadTooLargeError(
            f"{display} is {_size(len(data))}; the limit is {_size(limits.max_file_bytes)} per file"
        )
    sniffed = sniff(data)
    if sniffed.kind == "image":
        data_b64 = await asyncio.to_thread(_b64, data)
        return PreparedFile(display, "image", sniffed.mime, image=ImageInput(display, sniffed.mime, data_b64))
    if sniffed.kind in ("pdf", "zip"):
        return await _extract_document(display, sniffed.kind, data, limits)
    if sniffed.kind == "ole" and is_encrypted_office(data):
        raise AttachmentError(f"{display} is encrypted (password-protected Office document)")
    text = None if sniffed.kind == "ole" else await asyncio.to_thread(decode_text, data)
    if text is None:
        raise _unsupported(display, describe_binary(data))
    return PreparedFile(display, "text", "text/plain", text=cap_text(text, limits.max_extracted_chars))


async def _extract_document(display: str, kind: str, data: bytes, limits: AttachmentLimits) -> PreparedFile:
    request = ExtractRequest(kind, limits.max_extracted_chars, limits.max_pdf_pages)
    outcome = await get_pool().run(request, data, limits.extract_timeout)
    if outcome.status == "ok":
        return PreparedFile(display, "document", outcome.mime, text=outcome.detail)
    if outcome.status == "unsupported":
        raise _unsupported(display, outcome.detail)
    raise AttachmentError(f"{display} {outcome.detail}")


def _unsupported(display: str, looks_like: str) -> UnsupportedMediaError:
    return UnsupportedMediaError(
        f"{display}: unsupported file type (looks like {looks_like}); supported: {SUPPORTED_TYPES}"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _size(n: int) -> str:
    mib = 1024 * 1024
    if n >= mib and n % mib == 0:
        return f"{n // mib} MiB"
    return f"{n:,} bytes"
