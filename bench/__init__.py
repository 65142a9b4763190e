"""nanobot benchmark harness (issue 5).

Run ``python -m bench`` from the repository root. In one run it starts a fake, instant
OpenAI-compatible upstream (:mod:`bench.upstream`), the gateway (``nanobot serve``) and a
separate load-generator process (:mod:`bench.loadgen`), then prints a markdown table of
direct-to-upstream versus through-the-gateway numbers, with targets, and writes it as JSON.

The fake upstream is controlled through the text of the last user message, which the
gateway forwards unchanged, e.g. ``"deltas=2000 delay_ms=0"`` (see :mod:`bench.upstream`).
"""
