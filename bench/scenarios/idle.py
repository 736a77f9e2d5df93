"""An idle supervisor: what ten workers cost while nothing is asked of them.

The supervisor starts ten workers, settles for a second, then the benchmark
sleeps. The CPU of the whole tree (this process with the supervisor's loop
thread, the fork server, the resource tracker, the workers) is read with
psutil's cpu_times at the ends of each of three equal windows; memory as
PSS (and RSS) of the tree at the end. psutil counts CPU in 10 ms ticks per
process, so a short window carries an error of about 0.1 s over the tree.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.agents import bench_config
from bench.callers import running_supervisor
from bench.context import Bench
from bench.processes import MB, cpu_between, measure_memory, snapshot_cpu
from bench.report import Goal, Row, spread_text
from bench.stats import Spread

GROUP = "what the supervisor adds: idle"
ROW_CPU = "idle supervisor, 10 workers: CPU"
ROW_MEMORY = "idle supervisor, 10 workers: memory (PSS)"
ROWS = (ROW_CPU, ROW_MEMORY)

GOAL_CPU = Goal("<= 1 % of one core", "<=", 1.0)
WORKERS = 10
WINDOWS = 3


def worker_pids(supervisor: Any) -> list[int]:
    return [w["pid"] for w in supervisor.stats()["workers"] if w.get("pid")]


def run(bench: Bench) -> list[Row]:
    seconds = bench.plan.idle_seconds
    bench.progress(f"idle: {WORKERS} workers for {seconds:.0f} s")
    config = bench_config(
        bench.state_dir("idle"),
        bench.zero or bench.simulator,
        performance__max_concurrent=WORKERS,
    )
    root = os.getpid()

    percents = []
    with running_supervisor(config) as supervisor:
        time.sleep(min(1.0, seconds / 3))
        pids = worker_pids(supervisor)
        snapshots = [snapshot_cpu(root, pids)]
        for _ in range(WINDOWS):
            time.sleep(seconds / WINDOWS)
            snapshots.append(snapshot_cpu(root, pids))
        memory = measure_memory(root)
        alive = len(worker_pids(supervisor))

    uses = [cpu_between(a, b) for a, b in zip(snapshots, snapshots[1:], strict=False)]
    percents = [use.total_percent for use in uses]
    whole = cpu_between(snapshots[0], snapshots[-1])
    spread = Spread.of(percents)

    def percent(value: float) -> str:
        return f"{value:.2f} %"

    return [
        Row(
            GROUP,
            ROW_CPU,
            GOAL_CPU,
            f"{spread_text(spread, percent)} of one core "
            f"({whole.supervisor_s + whole.agents_s:.2f} s CPU in {whole.seconds:.0f} s)",
            spread.median,
            spread,
            data={"windows": [u.as_dict() for u in uses], "whole": whole.as_dict()},
        ),
        Row(
            GROUP,
            ROW_MEMORY,
            None,
            f"PSS {memory.pss / MB:.0f} MB, RSS {memory.rss / MB:.0f} MB "
            f"({memory.processes} processes, {alive} workers)",
            memory.pss / MB,
            data=memory.as_dict(),
        ),
    ]
