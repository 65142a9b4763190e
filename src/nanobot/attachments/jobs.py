"""What the event loop sends an extractor process and what comes back.

Kept apart from ``extract.py`` so the gateway process never imports the document parsers
(pymupdf, openpyxl): only the extractor processes do, which keeps start-up fast and the
gateway's memory small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OutcomeStatus = Literal["ok", "unreadable", "unsupported", "timeout"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an extraction produced: ``ok`` with ``mime`` and ``detail`` = the text, else the reason."""

    status: OutcomeStatus
    mime: str
    detail: str


@dataclass(frozen=True, slots=True)
class ExtractRequest:
    """What to extract (``kind`` from the sniffer: "pdf" or "zip") and within which budget."""

    kind: str
    max_chars: int
    max_pdf_pages: int
