"""Combine a user's text with their prepared files into what the model and the history get."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nanobot.attachments.model import PreparedFile
from nanobot.bus import ImageInput


@dataclass(frozen=True, slots=True)
class UserInput:
    """One user message with its files: ``content`` for the model this turn, ``history`` to store."""

    content: str
    history: str
    images: tuple[ImageInput, ...]


def compose_user_input(text: str, files: Sequence[PreparedFile]) -> UserInput:
    """Documents' text follows the user's text as ``[File: name]`` blocks; images become image
    parts for this turn and ``[image: name]`` placeholders in the history."""
    blocks = [f.model_block() for f in files if f.image is None]
    placeholders = [f.history_text() for f in files]
    return UserInput(
        content="\n\n".join(s for s in (text, *blocks) if s),
        history="\n\n".join(s for s in (text, *placeholders) if s),
        images=tuple(f.image for f in files if f.image is not None),
    )
