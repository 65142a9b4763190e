"""Uploaded files turned into model input: sniffed, bounded, extracted off the event loop.

Public surface::

    AttachmentLimits, PreparedFile          value objects
    prepare_file(name, data, limits)        one upload -> PreparedFile (image part or text)
    decode_data_url(url, param=, max_bytes=) a base64 data: URL -> (mime, bytes)
    compose_user_input(text, files)         text + files -> model content, history text, images
    shutdown_extractors()                   stop the extractor processes on exit

The type of a file is decided by its content, never its name or declared MIME type.
No HTTP object crosses this boundary; failures are :mod:`nanobot.errors` exceptions
that name the file (400 empty, 413 too large, 415 unsupported, 422 unreadable).
"""

from nanobot.attachments.compose import UserInput, compose_user_input
from nanobot.attachments.dataurl import decode_data_url
from nanobot.attachments.model import AttachmentLimits, PreparedFile
from nanobot.attachments.prepare import prepare_file
from nanobot.attachments.workers import shutdown_extractors

__all__ = [
    "AttachmentLimits",
    "PreparedFile",
    "UserInput",
    "compose_user_input",
    "decode_data_url",
    "prepare_file",
    "shutdown_extractors",
]
