"""The agent: one turn is context → LLM → tools → answer."""

from nanobot.agent.loop import AgentLoop

__all__ = ["AgentLoop"]
