"""`python -m bench`: run the scenarios, print the table, write the results.

    python -m bench            the full run (about 12 minutes on 2 cores)
    python -m bench --quick    every row, smaller, under two minutes
    python -m bench --smoke    every row, tiny, a few seconds: figures mean nothing

The table goes to stdout, progress to stderr. Results are written to
bench/results/ (or --out): results-DATE[-MODE].json with every figure and
its spread, .md with the table, .png with the plots. The exit status is 0
when every scenario ran (whether or not its targets hold), 1 when one
could not run or a process was left behind.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from bench.agents import build_zero_agent
from bench.context import PLANS, Bench
from bench.machine import describe_machine, one_line
from bench.plot import write_plot
from bench.processes import kill_leftovers, snapshot_cpu
from bench.report import Row, markdown, not_measured, summary_line, table_lines, write_json
from bench.scenarios import SCENARIOS

RESULTS_DIR = Path(__file__).with_name("results")


class CountingHandler(logging.Handler):
    """Counts the library's log records by level and shows none of them.

    The availability scenario makes workers die on purpose; their error
    logs would bury the table. The counts go into the JSON.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure ralph-supervisor against its targets and print one table.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller run, under two minutes")
    size.add_argument("--smoke", action="store_true", help="a tiny run: checks that it works")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="where to write results (bench/results)"
    )
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help="run only these scenarios: "
        + ", ".join(s.__name__.rpartition(".")[2] for s in SCENARIOS),
    )
    return parser.parse_args(argv)


def chosen_scenarios(only: str | None) -> list[Any]:
    if not only:
        return list(SCENARIOS)
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    known = {s.__name__.rpartition(".")[2]: s for s in SCENARIOS}
    unknown = wanted - set(known)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return [s for name, s in known.items() if name in wanted]


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, all cores."""
    times = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(times, name, 0.0) for name in fields)


def run_scenarios(
    bench: Bench, scenarios: list[Any], errors: list[str], others: dict[str, float]
) -> list[Row]:
    """Every scenario's rows; a scenario that fails still reports its rows.

    Beside each scenario, how busy the rest of the machine was: the CPU the
    machine spent minus the CPU of our own tree, as % of all its cores.
    A shared machine's neighbours show up here rather than as a mystery.
    """
    rows: list[Row] = []
    cores = os.cpu_count() or 1
    for scenario in scenarios:
        name = scenario.__name__.rpartition(".")[2]
        started, machine_before = time.monotonic(), busy_seconds()
        ours_before = snapshot_cpu(os.getpid(), []).total
        try:
            found = scenario.run(bench)
        except Exception as error:
            errors.append(f"{name}: {traceback.format_exc()}")
            bench.progress(f"{name} failed: {type(error).__name__}: {error}")
            found = [
                not_measured(scenario.GROUP, row, None, f"{type(error).__name__}: {error}")
                for row in scenario.ROWS
            ]
        rows += found

        elapsed = time.monotonic() - started
        ours = snapshot_cpu(os.getpid(), []).total - ours_before
        theirs = max(0.0, busy_seconds() - machine_before - ours)
        others[name] = round(100.0 * theirs / (elapsed * cores), 1) if elapsed else 0.0
        bench.progress(f"{name}: done; other processes used {others[name]} % of the machine")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = PLANS[mode]
    scenarios = chosen_scenarios(args.only)

    # The runner gives every agent NO_COLOR=1; the baselines, which run the
    # same agent with this process's environment, get the same.
    os.environ["NO_COLOR"] = "1"

    library_log = logging.getLogger("ralph_supervisor")
    counter = CountingHandler()
    library_log.addHandler(counter)
    library_log.setLevel(logging.WARNING)
    library_log.propagate = False

    machine = describe_machine()
    print(f"ralph-supervisor benchmark, {mode} run: {one_line(machine)}", file=sys.stderr)

    work_dir = Path(tempfile.mkdtemp(prefix="ralph-bench-"))
    errors: list[str] = []
    others: dict[str, float] = {}
    started = time.monotonic()
    try:
        zero, zero_note = build_zero_agent(work_dir)
        bench = Bench(plan, work_dir, zero, zero_note)
        bench.progress(f"zero_agent: {zero_note}")
        rows = run_scenarios(bench, scenarios, errors, others)
    finally:
        leftovers = kill_leftovers(os.getpid())
        shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.monotonic() - started

    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["others_cpu_percent_by_scenario"] = others
    notes = [
        f"zero_agent: {zero_note}",
        "CPU used by other processes on the machine during each scenario (% of all cores): "
        + ", ".join(f"{name} {value} %" for name, value in others.items()),
    ]
    if leftovers:
        notes.append(f"processes left behind and killed: {leftovers}")
    header = {
        "mode": mode,
        "elapsed_s": elapsed,
        "command": "python -m bench" + ("" if mode == "full" else f" --{mode}"),
        "notes": notes,
    }

    print(f"\nralph-supervisor benchmark, {mode} run, {elapsed:.0f} s")
    print(one_line(machine))
    print()
    for line in table_lines(rows):
        print(line)
    print()
    print(summary_line(rows))

    written = write_results(
        args.out,
        mode,
        rows,
        machine,
        header,
        bench.series,
        errors,
        leftovers,
        dict(counter.counts),
        plan,
    )
    for line in written:
        print(line)
    return 1 if errors or leftovers else 0


def rounded(value: Any, digits: int = 6) -> Any:
    """Samples to the microsecond: the JSON stays small enough to commit."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    return value


def write_results(
    out: Path,
    mode: str,
    rows: list[Row],
    machine: dict[str, Any],
    header: dict[str, Any],
    series: dict[str, Any],
    errors: list[str],
    leftovers: list[str],
    log_counts: dict[str, int],
    plan: Any,
) -> list[str]:
    """Write the JSON, the Markdown table and the PNG; say where they went."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"results-{datetime.date.today().isoformat()}"
    if mode != "full":
        stem += f"-{mode}"

    json_path = out / f"{stem}.json"
    write_json(
        json_path,
        {
            **header,
            "machine": machine,
            "plan": vars(plan),
            "rows": [row.as_dict() for row in rows],
            "summary": summary_line(rows),
            "errors": errors,
            "leftover_processes": leftovers,
            "library_log_records": log_counts,
            "series": rounded(series),
        },
    )
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown(rows, machine, header))

    lines = [f"results: {json_path}", f"table:   {md_path}"]
    png_path = out / f"{stem}.png"
    title = f"ralph-supervisor, {mode} run, {machine['date']}: {one_line(machine)}"
    skipped = write_plot(png_path, series, title)
    lines.append(f"plot:    {png_path}" if skipped is None else f"plot:    skipped: {skipped}")
    return lines
