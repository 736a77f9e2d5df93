"""A 5 MiB answer: the runner's reads against subprocess.run's.

The agent writes "ok" and 5 MiB of filler on stdout. The callers take turns
call by call: subprocess.run and asyncio (which read 32 KiB and 64 KiB at a
time), the runner with performance.buffer_size 4096 (the default) and 65536,
and a Supervisor (one worker) with each of the two sizes, whose answer also
crosses the worker's pipe. Each figure is the median time of a caller
divided by subprocess.run's median time in the same run.

zero_agent writes its 5 MiB at once, so its rows measure the reading; the
simulator's start-up dilutes the same difference, so its rows only inform.
"""

from __future__ import annotations

import contextlib
from typing import Any

from bench.agents import Agent, bench_config
from bench.callers import (
    AsyncioCaller,
    Call,
    interleave,
    runner_caller,
    running_supervisor,
    subprocess_run_caller,
    supervisor_caller,
)
from bench.context import Bench
from bench.report import Goal, Row, duration, not_measured
from bench.stats import Spread, percentile

GROUP = "what the supervisor adds: a 5 MiB answer"

SIZE = 5 * 1024 * 1024
GOAL = Goal("<= 1.2 x subprocess.run", "<=", 1.2)

RUN, ASYNCIO = "subprocess.run", "asyncio"
RUNNER_4K, RUNNER_64K = "runner (buffer 4096)", "runner (buffer 65536)"
SUPERVISOR_4K, SUPERVISOR_64K = "Supervisor (buffer 4096)", "Supervisor (buffer 65536)"

# (caller, judged) per agent: the simulator's rows only inform.
SHOWN = {
    "zero_agent": [
        (RUNNER_4K, True),
        (RUNNER_64K, False),
        (SUPERVISOR_4K, True),
        (SUPERVISOR_64K, False),
        (ASYNCIO, False),
    ],
    "simulator": [(RUNNER_4K, False), (SUPERVISOR_4K, False)],
}


def row_name(caller: str, label: str) -> str:
    return f"5 MiB answer, {caller} / subprocess.run ({label})"


ROWS = tuple(row_name(caller, label) for label, shown in SHOWN.items() for caller, _ in shown)

PROMPT = "@sim:profile=instant @sim:stdout_bytes=" + str(SIZE) + " big answer {}"


def whole(answer: str) -> bool:
    return len(answer) >= SIZE


def one_run(bench: Bench, agent: Agent, rounds: int) -> dict[str, list[float]]:
    def config(buffer_size: int) -> Any:
        return bench_config(
            bench.state_dir("large"),
            agent,
            performance__max_concurrent=1,
            performance__buffer_size=buffer_size,
        )

    small, large = config(4096), config(65536)
    with contextlib.ExitStack() as stack:
        supervisor_4k = stack.enter_context(running_supervisor(small))
        supervisor_64k = stack.enter_context(running_supervisor(large))
        asyncio_caller = AsyncioCaller(agent)
        stack.callback(asyncio_caller.close)

        callers: dict[str, Call] = {
            RUN: subprocess_run_caller(agent),
            ASYNCIO: asyncio_caller,
            RUNNER_4K: runner_caller(small, agent),
            RUNNER_64K: runner_caller(large, agent),
            SUPERVISOR_4K: supervisor_caller(supervisor_4k),
            SUPERVISOR_64K: supervisor_caller(supervisor_64k),
        }
        if rounds >= 3:
            interleave(callers, 1, PROMPT.format, check=whole)  # untimed warm-up
        return interleave(callers, rounds, PROMPT.format, check=whole)


def run(bench: Bench) -> list[Row]:
    plan = bench.plan
    agents = {
        "zero_agent": (bench.zero, plan.large_rounds_zero),
        "simulator": (bench.simulator, plan.large_rounds_sim),
    }
    rows = []
    for label, (agent, rounds) in agents.items():
        if agent is None:
            rows += [
                not_measured(GROUP, row_name(c, label), GOAL if j else None, bench.zero_note)
                for c, j in SHOWN[label]
            ]
            continue

        runs = []
        for rep in range(plan.large_reps):
            bench.progress(f"5 MiB answer: {label}, run {rep + 1} of {plan.large_reps}")
            runs.append(one_run(bench, agent, rounds))
        rows += rows_for(label, runs)
    return rows


def rows_for(label: str, runs: list[dict[str, list[float]]]) -> list[Row]:
    baseline = Spread.of([percentile(times[RUN], 0.5) for times in runs])
    rows = []
    for caller, judged in SHOWN[label]:
        ratio = Spread.of(
            [percentile(times[caller], 0.5) / percentile(times[RUN], 0.5) for times in runs]
        )
        caller_p50 = Spread.of([percentile(times[caller], 0.5) for times in runs])
        span = f" [{ratio.low:.2f}..{ratio.high:.2f}]" if ratio.runs > 1 else ""
        rows.append(
            Row(
                GROUP,
                row_name(caller, label),
                GOAL if judged else None,
                f"{ratio.median:.2f} x{span} ({duration(caller_p50.median)} vs "
                f"{duration(baseline.median)})",
                ratio.median,
                ratio,
                data={
                    "p50_s_by_caller": {
                        name: [percentile(times[name], 0.5) for times in runs] for name in runs[0]
                    },
                    "calls_per_caller_per_run": len(runs[0][RUN]),
                },
            )
        )
    return rows
