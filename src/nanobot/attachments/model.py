"""The value objects of the attachments package: limits in, prepared files out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from nanobot.bus import ImageInput
    from nanobot.config import ApiConfig

FileKind = Literal["image", "document", "text"]


@dataclass(frozen=True, slots=True)
class AttachmentLimits:
    """How big an upload may be and how much work reading it may cost."""

    max_file_bytes: int = 10 * 1024 * 1024
    max_extracted_chars: int = 200_000
    max_pdf_pages: int = 2000
    extract_timeout: float = 30.0

    @classmethod
    def from_api(cls, api: ApiConfig) -> AttachmentLimits:
        """The limits configured under ``api`` in ``config.json``."""
        return cls(
            max_file_bytes=api.max_file_bytes,
            max_extracted_chars=api.max_extracted_chars,
            max_pdf_pages=api.max_pdf_pages,
            extract_timeout=api.extract_timeout,
        )


@dataclass(frozen=True, slots=True)
class PreparedFile:
    """An uploaded file turned into model input: an image part, or extracted text.

    ``name`` is a display name only (sanitized, never used as a path); ``mime`` is what
    the content turned out to be, whatever the client declared.
    """

    name: str
    kind: FileKind
    mime: str
    image: ImageInput | None = None
    text: str | None = None

    def model_block(self) -> str:
        """The text the model sees for this file ("" for images, which go as image parts)."""
        if self.kind == "image":
            return ""
        return f"[File: {self.name}]\n{self.text or ''}"

    def history_text(self) -> str:
        """What the session history keeps for this file (images are not replayed)."""
        if self.kind == "image":
            return f"[image: {self.name}]"
        return self.model_block()
