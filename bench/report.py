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
    """One line of the table: a metric measured direct-to-upstream, through the floor proxy
    (non-stream rows) and through the gateway; compared with the floor when it was measured."""

    section: str
    metric: str
    direct: Number = None
    gateway: Number = None
    unit: str = ""
    compare: str = ""  # "added" (gateway - direct), "ratio" (gateway / direct) or ""
    target: str = ""
    ok: bool | None = None  # None: no target, or not measurable
    note: str = ""
    floor: Number = None  # the bare aiohttp proxy (bench.floor), same upstream, same run

    @property
    def delta(self) -> str:
        """The comparison column: added cost, or the gateway's share, against the floor when
        measured (the headline), and against direct."""
        parts = [
            _compare(self.gateway, base, self.compare, self.unit, name)
            for base, name in ((self.floor, "floor"), (self.direct, "direct"))
        ]
        return "; ".join(p for p in parts if p)


def _compare(value: Number, base: Number, how: str, unit: str, name: str) -> str:
    if value is None or base is None or not _finite(value, base):
        return ""
    if how == "added":
        return f"{value - base:+.3f} {unit} vs {name}".replace("  ", " ")
    if how == "ratio" and base:
        return f"{100 * value / base:.0f}% of {name}"
    return ""


@dataclass(slots=True)
class Spread:
    """One key metric measured ``repeats`` times: its values per column, in run order."""

    metric: str
    unit: str
    direct: list[float]
    floor: list[float]
    gateway: list[float]

    @staticmethod
    def summary(values: list[float]) -> str:
        """``min / median / max``."""
        if not values:
            return "–"
        s = sorted(values)
        return " / ".join(fmt(v) for v in (s[0], _median(s), s[-1]))


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


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
    spreads: list[Spread] = field(default_factory=list)

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
            "spread": [asdict(s) for s in self.spreads],
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
            "| section | metric | direct | floor | gateway | gateway vs floor; vs direct | target | pass |",
            "|---|---|---:|---:|---:|---|---|:---:|",
        ]
        for r in self.rows:
            mark = {True: "PASS", False: "**FAIL**", None: "–" if not r.target else "n/a"}[r.ok]
            metric = f"{r.metric} ({r.unit})" if r.unit else r.metric
            if r.note:
                metric += f" — {r.note}"
            lines.append(
                f"| {r.section} | {metric} | {fmt(r.direct)} | {fmt(r.floor)} | {fmt(r.gateway)} "
                f"| {r.delta} | {r.target} | {mark} |"
            )
        if self.spreads:
            n = max(len(s.gateway) for s in self.spreads)
            lines += [
                "",
                f"Run-to-run spread: {n} repeats in this run, each point on a fresh gateway "
                "(min / median / max):",
                "",
                "| metric | direct | floor | gateway | gateway ÷ floor (medians) |",
                "|---|---|---|---|---|",
            ]
            for s in self.spreads:
                ratio = ""
                if s.floor and s.gateway and _median(s.floor):
                    ratio = f"{_median(s.gateway) / _median(s.floor):.2f}"
                lines.append(
                    f"| {s.metric} ({s.unit}) | {s.summary(s.direct)} | {s.summary(s.floor)} "
                    f"| {s.summary(s.gateway)} | {ratio} |"
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
