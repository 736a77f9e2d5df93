"""`ralph-supervisor report`: what a loop did, read from its state directory alone.

    STATE_DIR/history.jsonl    one record per iteration (history.py)
    STATE_DIR/checkpoint.json  where the loop stands, and why it stopped

    build_report(name, state_dir)   the summary and the records of one task
    print_report(report, out)       the summary, then a table of the last ones
    plot_reports(reports, path)     duration and lines changed per iteration

It only reads, so it works on a running loop as on a finished one. The
history is current to the last iteration; the checkpoint lags a running
loop by up to loop.checkpoint_interval iterations, so the counts come from
the history and only the status and the reason from the checkpoint.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from ralph_supervisor.checkpoint import RUNNING, Checkpoint, CheckpointCorrupt, CheckpointStore
from ralph_supervisor.history import HISTORY_NAME, read_history

EXIT_OK = 0
EXIT_NOTHING = 1

DEFAULT_LAST = 20

# Outcomes that say the agent answered; any other outcome is an error kind.
ANSWERED = ("success", "complete")

PLOT_COLOURS = {
    "success": "#2ca02c",
    "complete": "#1f77b4",
    "timeout": "#ff7f0e",
    "throttled": "#bcbd22",
    "auth": "#9467bd",
    "service": "#8c564b",
}
ERROR_COLOUR = "#d62728"

# Outside the axes, on the right: a legend inside would hide bars.
LEGEND: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small"}

NO_MATPLOTLIB = (
    "ralph-supervisor report: --plot needs matplotlib, which is not installed: "
    "pip install 'ralph-supervisor[bench]'"
)


@dataclass
class TaskReport:
    """One task's report: the summary (JSON-ready) and every record read."""

    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.records) or self.summary["checkpoint"] is not None


# ---------------------------------------------------------------------------
# Building


def build_report(
    name: str,
    state_dir: Path,
    *,
    last: int = DEFAULT_LAST,
    running_pid: int | None = None,
) -> TaskReport:
    """Read one task's history and checkpoint; never writes anything.

    running_pid: the live `start` holding the pidfile of this state
    directory, if any (commands._running_pid).
    """
    history_path = state_dir / HISTORY_NAME
    history = read_history(history_path)
    records = history.records

    checkpoint: Checkpoint | None = None
    problem = None
    try:
        checkpoint = CheckpointStore(state_dir).peek()
    except CheckpointCorrupt as error:
        problem = f"unreadable checkpoint: {error}"

    summary: dict[str, Any] = {
        "task": name,
        "state_dir": str(state_dir),
        "history": str(history_path),
        "skipped_lines": history.skipped,
        **_status(checkpoint, problem, running_pid),
        "iterations": len(records),
        "last_iteration": records[-1].get("number") if records else None,
        "runs": len({record.get("run") for record in records}),
        "outcomes": _count(records, "outcome"),
        "error_types": _count([r for r in records if r.get("error_type")], "error_type"),
        "agents": _count(records, "agent", missing="unknown"),
        "attempts": sum(_number(record.get("attempts")) for record in records),
        "time": _times(records),
        "changes": _changes(records),
        "idle_iterations": records[-1].get("idle_iterations") if records else None,
        "repeat_count": records[-1].get("repeat_count") if records else None,
        "checkpoint": None if checkpoint is None else checkpoint.to_dict(),
        "last": records[-last:] if last > 0 else [],
    }
    return TaskReport(summary, records)


def _status(
    checkpoint: Checkpoint | None, problem: str | None, running_pid: int | None
) -> dict[str, Any]:
    # The checkpoint lags a running loop (none yet before the first
    # interval, or the last run's): a live start is running this task
    # unless the task's checkpoint says it ended in that very process.
    ended_here = (
        checkpoint is not None and checkpoint.status != RUNNING and checkpoint.pid == running_pid
    )
    if running_pid is not None and not ended_here:
        return {
            "status": RUNNING,
            "running": True,
            "pid": running_pid,
            "stop_reason": None,
            "stop_message": problem,
        }
    if checkpoint is None:
        return {
            "status": "unknown",
            "running": False,
            "pid": None,
            "stop_reason": None,
            "stop_message": problem,
        }

    status = checkpoint.status
    message = checkpoint.stop_message
    if status == RUNNING:
        # A running checkpoint and no live process: killed, or the host went
        # down. A start resumes it.
        status = "interrupted"
        message = (
            f"the process (pid {checkpoint.pid}) ended without a stop; "
            "`ralph-supervisor start` resumes it"
        )
    return {
        "status": status,
        "running": False,
        "pid": None,
        "stop_reason": checkpoint.stop_reason,
        "stop_message": message,
    }


def _count(records: list[dict[str, Any]], key: str, missing: str = "?") -> dict[str, int]:
    counts = collections.Counter(str(record.get(key) or missing) for record in records)
    return dict(counts.most_common())


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return value


def _times(records: list[dict[str, Any]]) -> dict[str, Any]:
    durations = sorted(_number(record.get("duration_s")) for record in records)
    if not durations:
        return {"calls_s": 0.0}

    first = _parse_time(records[0].get("started_at"))
    last = _parse_time(records[-1].get("started_at"))
    ended = None
    if last is not None:
        ended = last.timestamp() + _number(records[-1].get("duration_s"))
    return {
        "calls_s": round(sum(durations), 3),
        "mean_s": round(sum(durations) / len(durations), 3),
        "p50_s": _percentile(durations, 0.5),
        "p90_s": _percentile(durations, 0.9),
        "max_s": round(durations[-1], 3),
        "first_started_at": records[0].get("started_at"),
        "span_s": None if first is None or ended is None else round(ended - first.timestamp(), 3),
    }


def _parse_time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _percentile(ordered: list[float], quantile: float) -> float:
    # Nearest rank, as the loop's summary does.
    index = max(0, min(len(ordered) - 1, int(round(quantile * len(ordered) + 0.5)) - 1))
    return round(ordered[index], 3)


def _changes(records: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [r for r in records if isinstance(r.get("files_changed"), int)]
    paths: set[str] = set()
    complete = True
    for record in measured:
        listed = record.get("paths") or []
        paths.update(str(path) for path in listed)
        complete = complete and len(listed) >= record["files_changed"]
    return {
        "measured": len(measured),
        "changed": sum(1 for r in measured if r["files_changed"] > 0),
        "files": len(paths),
        # Each record keeps at most history.MAX_PATHS paths.
        "files_exact": complete,
        "lines_added": sum(_number(r.get("lines_added")) for r in measured),
        "lines_removed": sum(_number(r.get("lines_removed")) for r in measured),
    }


# ---------------------------------------------------------------------------
# Text


def print_report(report: TaskReport, out: IO[str]) -> None:
    """The summary, then a table of the last iterations."""
    summary = report.summary
    line = _Lines(out)

    out.write(f"task {summary['task']}: {_headline(summary)}\n")
    if summary["stop_message"]:
        line("why", summary["stop_message"])
    line("iterations", _describe_iterations(summary))
    line("errors", _describe_counts(summary["error_types"]) or "none")
    line("agents", _describe_counts(summary["agents"]) or "-")
    line("time", _describe_time(summary["time"]))
    line("changes", _describe_changes(summary))
    skipped = summary["skipped_lines"]
    note = f" ({len(skipped)} broken line(s) skipped: {skipped})" if skipped else ""
    line("history", f"{summary['history']}{note}")

    if summary["last"]:
        count = len(summary["last"])
        out.write(f"\n  the last {count} iteration{'s' if count != 1 else ''}:\n")
        _print_table(summary["last"], out)


class _Lines:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, label: str, value: object) -> None:
        self.out.write(f"  {label + ':':<12}{value}\n")


def _headline(summary: dict[str, Any]) -> str:
    status = summary["status"]
    checkpoint = summary["checkpoint"]
    at = f" after iteration {checkpoint['iteration']}" if checkpoint else ""
    if summary["running"]:
        latest = summary["last_iteration"]
        return f"running (pid {summary['pid']})" + (
            f", at iteration {latest}" if latest is not None else ", no iteration yet"
        )
    if summary["stop_reason"]:
        return f"{status} ({summary['stop_reason']}){at}"
    if status == "unknown":
        return "no checkpoint" + (" yet" if summary["iterations"] else "")
    return f"{status}{at}"


def _describe_iterations(summary: dict[str, Any]) -> str:
    runs = summary["runs"]
    outcomes = _describe_counts(summary["outcomes"]) or "-"
    return (
        f"{summary['iterations']} in {runs} run{'s' if runs != 1 else ''}, "
        f"{summary['attempts']:g} attempts; {outcomes}"
    )


def _describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def _describe_time(times: dict[str, Any]) -> str:
    if "mean_s" not in times:
        return "-"
    text = (
        f"{times['calls_s']:.1f} s in calls (mean {times['mean_s']:.2f} s, p90 "
        f"{times['p90_s']:.2f} s, max {times['max_s']:.2f} s)"
    )
    if times.get("span_s") is not None:
        text += f"; {_clock(times['span_s'])} from the first start, {times['first_started_at']}"
    return text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _describe_changes(summary: dict[str, Any]) -> str:
    changes = summary["changes"]
    if not changes["measured"]:
        return "not measured (the workdir is not a git work tree)"
    files = f"{changes['files']}" if changes["files_exact"] else f"at least {changes['files']}"
    text = (
        f"{files} file{'s' if changes['files'] != 1 else ''}, +{changes['lines_added']:g} "
        f"-{changes['lines_removed']:g} lines; {changes['changed']} of {changes['measured']} "
        "iterations changed something"
    )
    idle = summary["idle_iterations"]
    if idle:
        text += f"; the last {idle} changed nothing"
    return text


# (heading, width, alignment): numbers to the right, words to the left.
TABLE_COLUMNS = (
    ("#", 5, ">"),
    ("run", 3, ">"),
    ("started", 8, ">"),
    ("seconds", 7, ">"),
    ("outcome", 15, "<"),
    ("tries", 5, ">"),
    ("files", 5, ">"),
    ("+lines", 6, ">"),
    ("-lines", 6, ">"),
    ("idle", 4, ">"),
    ("same", 4, ">"),
)


def _print_table(records: list[dict[str, Any]], out: IO[str]) -> None:
    header = "  ".join(f"{name:{align}{width}}" for name, width, align in TABLE_COLUMNS)
    out.write(f"  {header}  agent\n")
    for record in records:
        cells = [
            record.get("number"),
            record.get("run"),
            _time_of_day(record.get("started_at")),
            f"{_number(record.get('duration_s')):.2f}",
            record.get("outcome"),
            record.get("attempts"),
            record.get("files_changed"),
            _signed("+", record.get("lines_added")),
            _signed("-", record.get("lines_removed")),
            record.get("idle_iterations"),
            record.get("repeat_count"),
        ]
        row = "  ".join(
            f"{_cell(value):{align}{width}}"
            for value, (_, width, align) in zip(cells, TABLE_COLUMNS, strict=True)
        )
        out.write(f"  {row}  {record.get('agent') or '-'}\n")


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _signed(sign: str, value: Any) -> str | None:
    return None if value is None else f"{sign}{value}"


def _time_of_day(value: Any) -> str:
    parsed = _parse_time(value)
    return "-" if parsed is None else parsed.strftime("%H:%M:%S")


# ---------------------------------------------------------------------------
# The plot


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_reports(reports: list[TaskReport], path: Path) -> None:
    """Per task: each iteration's duration coloured by outcome, and its lines changed."""
    from matplotlib.figure import Figure

    shown = [report for report in reports if report.records] or reports[:1]
    figure = Figure(figsize=(10, 5.5 * len(shown)), layout="constrained")
    axes = figure.subplots(2 * len(shown), 1, squeeze=False)
    for index, report in enumerate(shown):
        _plot_task(report, axes[2 * index][0], axes[2 * index + 1][0])
    figure.savefig(path, dpi=100)


def _plot_task(report: TaskReport, top: Any, bottom: Any) -> None:
    from matplotlib.patches import Patch

    summary = report.summary
    records = report.records
    numbers = [record.get("number") for record in records]
    in_order = all(
        isinstance(a, int) and isinstance(b, int) and a < b
        for a, b in zip(numbers, numbers[1:], strict=False)
    )
    xs = numbers if in_order and numbers else list(range(1, len(records) + 1))
    xlabel = "iteration" if in_order else "iteration, in the order run (numbers repeat on resume)"

    # Duration, one bar per iteration, coloured by outcome.
    outcomes = [str(record.get("outcome")) for record in records]
    colours = [PLOT_COLOURS.get(outcome, ERROR_COLOUR) for outcome in outcomes]
    durations = [_number(record.get("duration_s")) for record in records]
    top.bar(xs, durations, color=colours, width=0.8)
    kinds = [
        Patch(color=PLOT_COLOURS.get(outcome, ERROR_COLOUR), label=outcome)
        for outcome in dict.fromkeys(outcomes)
    ]
    if kinds:
        top.legend(handles=kinds, **LEGEND)
    top.set_ylabel("duration (s)")
    top.set_title(f"task {summary['task']}: {len(records)} iterations, {_headline(summary)}")

    # Lines changed: added up, removed down; a grey dot where nothing changed.
    added = [_number(record.get("lines_added")) for record in records]
    removed = [-_number(record.get("lines_removed")) for record in records]
    bottom.bar(xs, added, color="#2ca02c", width=0.8, label="+lines")
    bottom.bar(xs, removed, color="#d62728", width=0.8, label="-lines")
    idle = [
        x
        for x, record, outcome in zip(xs, records, outcomes, strict=True)
        if record.get("files_changed") == 0 and outcome in ANSWERED
    ]
    if idle:
        bottom.plot(idle, [0] * len(idle), "o", color="#7f7f7f", label="answered, no change")
    binary = [
        x
        for x, record, up, down in zip(xs, records, added, removed, strict=True)
        if _number(record.get("files_changed")) > 0 and up == down == 0
    ]
    if binary:
        bottom.plot(binary, [0] * len(binary), "^", color="#1f77b4", label="files, no lines")
    failed = [x for x, outcome in zip(xs, outcomes, strict=True) if outcome not in ANSWERED]
    if failed:
        bottom.plot(failed, [0] * len(failed), "x", color=ERROR_COLOUR, label="failed")
    bottom.axhline(0, color="black", linewidth=0.5)
    if records:
        bottom.legend(**LEGEND)
    bottom.set_ylabel("lines changed")
    bottom.set_xlabel(xlabel)
    if not summary["changes"]["measured"]:
        bottom.set_title("changes not measured: the workdir is not a git work tree")


# ---------------------------------------------------------------------------
# The command


def add_report_parser(subparsers: Any) -> None:
    from ralph_supervisor.commands import _add_config_option, _add_workdir_option, _Formatter

    parser = subparsers.add_parser(
        "report",
        help="summarise what a loop did: iterations, outcomes, time, changes, why it stopped",
        description=(
            "Summarise a loop from its state directory (history.jsonl, checkpoint.json):\n"
            "iterations, outcomes by type, agents, time, what changed in the work tree,\n"
            "why it stopped, and a table of the last iterations. It only reads, so it\n"
            "works on a running loop as on a finished one. Exit 0 with a report, 1 when\n"
            "no loop has run in the workdir, or --plot cannot be drawn."
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(parser)
    _add_workdir_option(parser)
    parser.add_argument(
        "--last",
        metavar="N",
        type=int,
        default=DEFAULT_LAST,
        help="iterations in the table (0: none)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="also draw each iteration's duration and lines changed (needs matplotlib)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    from ralph_supervisor.commands import _locate, _running_pid, _task_dirs

    # Say so before anything is printed: a half-done report would hide it.
    if args.plot and not have_matplotlib():
        print(NO_MATPLOTLIB, file=sys.stderr)
        return EXIT_NOTHING

    config, workdir, state_dir = _locate(args)
    pid = _running_pid(state_dir)
    reports = [
        build_report(
            task["name"], Path(task["state_dir"]), last=max(args.last, 0), running_pid=pid
        )
        for task in _task_dirs(config, workdir, state_dir)
    ]
    if not any(report.found for report in reports):
        print(
            f"ralph-supervisor report: no loop has run in {workdir}: no {HISTORY_NAME} or "
            f"checkpoint.json in {state_dir}",
            file=sys.stderr,
        )
        return EXIT_NOTHING

    if args.json:
        payload = {"workdir": str(workdir), "tasks": [report.summary for report in reports]}
        print(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        for index, report in enumerate(reports):
            if index:
                sys.stdout.write("\n")
            print_report(report, sys.stdout)

    if args.plot:
        path = Path(os.path.expanduser(args.plot))
        plot_reports(reports, path)
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK
