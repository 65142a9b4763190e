"""nanobot: a small, fast gateway that puts a tool-using AI agent behind an OpenAI-compatible API."""

__version__ = "0.1.0"
