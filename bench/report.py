"""Rows of the result table, and the three ways they are written out.

A row is one target: what was measured, the figure that is judged against
the target (the median over repeated runs), the spread of that figure, and
whether it holds. Rows without a target say so ("—"): they are there to
explain the others (the split of an overhead, a baseline's figure).

    rows --> print_table (stdout)   write_json (everything, samples aside)
                                    write_markdown (the table, date, machine)
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import Spread

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True)
class Goal:
    """A target: `value OP limit`, written for people as `text`."""

    text: str
    op: str
    limit: float

    def holds(self, value: float) -> bool:
        return _COMPARE[self.op](value, self.limit)


@dataclass
class Row:
    """One line of the table."""

    group: str
    name: str
    goal: Goal | None
    measured: str
    value: float | None = None
    spread: Spread | None = None
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    # Set when the verdict needs more than one figure (see concurrency).
    verdict: bool | None = None

    @property
    def holds(self) -> bool | None:
        if self.verdict is not None:
            return self.verdict
        if self.goal is None or self.value is None or math.isnan(self.value):
            return None
        return self.goal.holds(self.value)

    @property
    def verdict_text(self) -> str:
        if self.goal is None and self.verdict is None:
            return "—"
        if self.holds is None:
            return "skipped"
        return "yes" if self.holds else "NO"

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "target": self.goal.text if self.goal else None,
            "measured": self.measured,
            "value": self.value,
            "spread": self.spread.as_dict() if self.spread else None,
            "holds": self.holds,
            "note": self.note,
            "data": self.data,
        }


def not_measured(group: str, name: str, goal: Goal | None, why: str) -> Row:
    return Row(group, name, goal, f"not measured: {why}", note=why)


# -- formatting ------------------------------------------------------------


def duration(seconds: float, *, signed: bool = False) -> str:
    """A time in the unit that keeps it readable: µs, ms or s."""
    if math.isnan(seconds):
        return "n/a"
    sign = "+" if signed and seconds >= 0 else ""
    size = abs(seconds)
    if size < 1e-3:
        return f"{sign}{seconds * 1e6:.0f} µs"
    if size < 1.0:
        return f"{sign}{seconds * 1e3:.2f} ms"
    return f"{sign}{seconds:.2f} s"


def spread_text(spread: Spread, show: Callable[[float], str]) -> str:
    """`median [min..max] over N runs`; a single run shows its value alone."""
    if spread.runs <= 1:
        return show(spread.median)
    return f"{show(spread.median)} [{show(spread.low)}..{show(spread.high)}, {spread.runs} runs]"


# -- output ----------------------------------------------------------------


def table_lines(rows: Sequence[Row]) -> list[str]:
    """The table as aligned text, one group after another."""
    headers = ("target", "goal", "measured", "holds")
    cells = [(r.name, r.goal.text if r.goal else "—", r.measured, r.verdict_text) for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    lines = [line(headers), "-+-".join("-" * w for w in widths)]
    group = None
    for row, cell in zip(rows, cells, strict=True):
        if row.group != group:
            group = row.group
            lines.append(f"[{group}]")
        lines.append(line(cell))
    return lines


def summary_line(rows: Sequence[Row]) -> str:
    judged = [r for r in rows if r.holds is not None]
    missed = [r.name for r in judged if not r.holds]
    skipped = sum(1 for r in rows if (r.goal or r.verdict is not None) and r.holds is None)
    text = f"{len(judged) - len(missed)} of {len(judged)} targets hold"
    if skipped:
        text += f", {skipped} not measured"
    if missed:
        text += "; missed: " + "; ".join(missed)
    return text


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return str(value)


def markdown(rows: Sequence[Row], machine: dict[str, Any], header: dict[str, Any]) -> str:
    """The table as Markdown, with the date, the machine and the notes."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        f"# ralph-supervisor benchmark, {header['mode']} run, {machine['date'][:10]}",
        "",
        f"- date: {machine['date']}",
        f"- machine: {machine['cores']} cores, {machine['cpu_model']}, "
        f"{machine['memory_total_mb']} MB, {machine['platform']}",
        f"- Python {machine['python']} ({machine['python_executable']}), "
        f"PYTHONDONTWRITEBYTECODE={'1' if machine['pythondontwritebytecode'] else 'unset'}",
        f"- ralph-supervisor {machine['ralph_supervisor_version']}, "
        f"source {machine['source_revision']}",
        f"- load average at start: {machine['load_average_at_start']}, "
        f"at end: {machine.get('load_average_at_end')}",
        f"- run time: {header['elapsed_s']:.0f} s; command: `{header['command']}`",
        "",
        f"**{summary_line(rows)}**",
        "",
        "| target | goal | measured | holds |",
        "| --- | --- | --- | --- |",
    ]
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            lines.append(f"| **{cell(group)}** | | | |")
        goal = row.goal.text if row.goal else "—"
        lines.append(
            f"| {cell(row.name)} | {cell(goal)} | {cell(row.measured)} | {row.verdict_text} |"
        )

    notes = [(row.name, row.note) for row in rows if row.note]
    if notes or header.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {text}" for text in header.get("notes", [])]
        lines += [f"- {name}: {note}" for name, note in notes]
    return "\n".join(lines) + "\n"
