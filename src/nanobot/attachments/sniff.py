"""What an upload really is, decided from its bytes alone (never its name or declared type)."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Literal

SUPPORTED_TYPES = (
    "PNG, JPEG, GIF and WebP images; PDF, DOCX, XLSX and PPTX documents; "
    "text files (TXT, Markdown, CSV, JSON, code) in UTF-8, UTF-16 or Windows-1252"
)

SniffKind = Literal["image", "pdf", "zip", "ole", "text-or-binary"]

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local header, or an empty archive
# Magic numbers of common types we do not accept, only to name them in the 415 message.
_KNOWN_OTHERS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "application/gzip"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"BZh", "application/x-bzip2"),
    (b"\x7fELF", "application/x-executable"),
    (b"MZ", "application/x-msdownload"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"ID3", "audio/mpeg"),
    (b"OggS", "audio/ogg"),
    (b"fLaC", "audio/flac"),
    (b"{\\rtf", "application/rtf"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
)
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")
_TEXT_SAMPLE_CHARS = 1 << 20
_MAX_CONTROL_RATIO = 0.01
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16: its BOM starts like UTF-16-LE's
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass(frozen=True, slots=True)
class Sniffed:
    """The container an upload's magic bytes point at, and its MIME type if already known."""

    kind: SniffKind
    mime: str


def sniff(data: bytes) -> Sniffed:
    """Classify ``data`` by its leading bytes.

    Images and PDFs are settled here; ZIP containers are told apart (DOCX, XLSX, PPTX or
    plain ZIP) by the extractor, which has to open them anyway; anything else is text
    or binary, which :func:`decode_text` decides.
    """
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Sniffed("image", "image/png")
    if head.startswith(b"\xff\xd8\xff"):
        return Sniffed("image", "image/jpeg")
    if head.startswith((b"GIF87a", b"GIF89a")):
        return Sniffed("image", "image/gif")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return Sniffed("image", "image/webp")
    if b"%PDF-" in data[:1024]:  # readers accept up to 1 KiB of junk before the header
        return Sniffed("pdf", "application/pdf")
    if head.startswith(_ZIP_MAGICS):
        return Sniffed("zip", "application/zip")
    if head.startswith(_OLE_MAGIC):
        return Sniffed("ole", "application/x-ole-storage")
    return Sniffed("text-or-binary", "text/plain")


def is_encrypted_office(data: bytes) -> bool:
    """Whether an OLE container is a password-protected DOCX/XLSX/PPTX (it holds ``EncryptionInfo``)."""
    return "EncryptionInfo".encode("utf-16-le") in data


def describe_binary(data: bytes) -> str:
    """A short guess at what unsupported ``data`` is, for the 415 message."""
    if data.startswith(_OLE_MAGIC):
        return "a legacy Microsoft Office file (.doc/.xls/.ppt)"
    if data[4:8] == b"ftyp":
        return "video/mp4 or image/heic"
    for magic, mime in _KNOWN_OTHERS:
        if data.startswith(magic):
            return mime
    return "binary data"


def decode_text(data: bytes) -> str | None:
    """``data`` as text, or ``None`` if it is binary.

    A BOM picks UTF-8/16/32; otherwise NUL bytes mean binary, then strict UTF-8 is
    tried, then Windows-1252. The decoded text must also be mostly printable (under 1%
    control characters in its first MiB), which rejects binary that happens to decode.
    """
    text: str | None = None
    for bom, codec in _BOMS:
        if data.startswith(bom):
            text = _try_decode(data, codec)
            break
    else:
        if b"\x00" in data:
            return None
        text = _try_decode(data, "utf-8") or _try_decode(data, "cp1252")
    if text is None or not _mostly_printable(text[:_TEXT_SAMPLE_CHARS]):
        return None
    return text.replace("\r\n", "\n")


def _try_decode(data: bytes, codec: str) -> str | None:
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        return None


def _mostly_printable(sample: str) -> bool:
    if not sample:
        return True
    controls = sum(1 for _ in _CONTROL_CHARS.finditer(sample))
    return controls <= len(sample) * _MAX_CONTROL_RATIO
