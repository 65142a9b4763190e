"""Result rows, targets, and their rendering as a markdown table and JSON."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

Number = float | int | None


@dataclass(slots=True)
class Row:
    """One line of the table: a metric measured direct-to-upstream and through the gateway."""

    section: str
    metric: str
    direct: Number = None
    gateway: Number = None
    unit: str = ""
    compare: str = ""  # "added" (gateway - direct), "ratio" (gateway / direct) or ""
    target: str = ""
    ok: bool | None = None  # None: no target, or not measurable
    note: str = ""

    @property
    def delta(self) -> str:
        """The comparison column: added cost, or gateway as a share of direct."""
        if self.direct is None or self.gateway is None or not _finite(self.direct, self.gateway):
            return ""
        if self.compare == "added":
            return f"{self.gateway - self.direct:+.3f} {self.unit}".strip()
        if self.compare == "ratio" and self.direct:
            return f"{100 * self.gateway / self.direct:.0f}% of direct"
        return ""


def _finite(*values: Number) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def check(value: Number, test: Callable[[float], bool]) -> bool | None:
    """``test(value)``, or None when the value was not measured."""
    if value is None or not _finite(value):
        return None
    return bool(test(float(value)))


def both(*results: bool | None) -> bool | None:
    """All-of for pass/fail cells: False beats None beats True."""
    if any(r is False for r in results):
        return False
    if any(r is None for r in results):
        return None
    return True


@dataclass(slots=True)
class Report:
    """Everything one run produced."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        """Append a row and return it."""
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        """Append a note printed under the table."""
        self.notes.append(text)

    def to_json(self) -> bytes:
        """The report as indented JSON (rows carry their ``delta`` text too)."""
        rows = [{**asdict(r), "delta": r.delta} for r in self.rows]
        data = {
            "machine": self.machine,
            "settings": self.settings,
            "rows": rows,
            "notes": self.notes,
            "raw": self.raw,
        }
        return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)

    def write_json(self, path: Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.to_json() + b"\n")

    def markdown(self) -> str:
        """The machine line, the table and the notes, as markdown."""
        m = self.machine
        lines = [
            "## nanobot benchmark",
            "",
            f"Machine: {m.get('cpu')}, {m.get('cores')} cores, Python {m.get('python')}, "
            f"kernel {m.get('kernel')}, aiohttp {m.get('aiohttp')}, {m.get('event_loop')}. "
            f"Settings: {', '.join(f'{k}={v}' for k, v in self.settings.items())}.",
            "",
            "| section | metric | direct | gateway | gateway vs direct | target | pass |",
            "|---|---|---:|---:|---|---|:---:|",
        ]
        for r in self.rows:
            mark = {True: "PASS", False: "**FAIL**", None: "–" if not r.target else "n/a"}[r.ok]
            metric = f"{r.metric} ({r.unit})" if r.unit else r.metric
            if r.note:
                metric += f" — {r.note}"
            lines.append(
                f"| {r.section} | {metric} | {fmt(r.direct)} | {fmt(r.gateway)} | {r.delta} "
                f"| {r.target} | {mark} |"
            )
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines)


def fmt(value: Number) -> str:
    """A number for the table: thousands separators, 3 significant decimals for small values."""
    if value is None:
        return "–"
    if isinstance(value, int) or (math.isfinite(value) and abs(value) >= 100):
        return f"{value:,.0f}"
    if not math.isfinite(value):
        return "–"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
