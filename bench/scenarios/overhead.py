"""What the supervisor adds to one call, split layer by layer.

The callers take turns call by call, all beside a running Supervisor with
one worker:

    subprocess.run          the baselines
    asyncio
    runner                  run_call() in this process, as QChatAdapter runs it
    QChatAdapter            + validation, breaker, rate limit, retry loop
    worker-like runner      run_call() in a process forked like a worker, timed there
    Supervisor              submit() -> result(), with the worker hop

Each figure is a difference of percentiles between two callers of the same
run (Supervisor p50 minus runner p50, say); the table gives its median over
runs. The supervisor's own hop is Supervisor minus runner: the parent's
policy, the pipe to the worker and back, the worker's way of starting the
agent, and the caller's thread being woken. Taking the worker-like runner
away from it leaves the pipe, the loop and the wake-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from bench.agents import Agent, bench_config
from bench.callers import (
    AsyncioCaller,
    Timed,
    WorkerLikeRunner,
    adapter_caller,
    interleave,
    runner_caller,
    running_supervisor,
    subprocess_run_caller,
    supervisor_caller,
)
from bench.context import Bench
from bench.report import Goal, Row, duration, not_measured, spread_text
from bench.stats import Spread, percentile
from ralph_supervisor.adapter import QChatAdapter

GROUP = "what the supervisor adds: one call to a zero-latency agent"

HOP_GOAL = Goal("<= 0.3 ms at p50", "<=", 0.3e-3)

RUN, ASYNCIO, RUNNER, ADAPTER = "subprocess.run", "asyncio", "runner", "QChatAdapter"
WORKER_LIKE, SUPERVISOR = "worker-like runner", "Supervisor"

ZERO = "zero_agent"
SIM = "simulator instant"

# (row, minuend, subtrahend) for each agent; the goal is on the hop only.
FIGURES: dict[str, list[tuple[str, str, str]]] = {
    ZERO: [
        (f"overhead, Supervisor - subprocess.run ({ZERO})", SUPERVISOR, RUN),
        (f"overhead, Supervisor - asyncio ({ZERO})", SUPERVISOR, ASYNCIO),
        ("  split: runner - subprocess.run", RUNNER, RUN),
        ("  split: QChatAdapter policy (adapter - runner)", ADAPTER, RUNNER),
        ("  split: an agent start in a worker (worker-like - runner)", WORKER_LIKE, RUNNER),
        (f"supervisor's own hop, Supervisor - runner ({ZERO})", SUPERVISOR, RUNNER),
        ("  hop without the agent start (Supervisor - worker-like)", SUPERVISOR, WORKER_LIKE),
    ],
    SIM: [
        (f"overhead, Supervisor - subprocess.run ({SIM})", SUPERVISOR, RUN),
        (f"overhead, Supervisor - asyncio ({SIM})", SUPERVISOR, ASYNCIO),
        (f"supervisor's own hop, Supervisor - runner ({SIM})", SUPERVISOR, RUNNER),
    ],
}

ROWS = tuple(figure[0] for label in (ZERO, SIM) for figure in FIGURES[label])

PROMPT = "@sim:profile=instant hello {}"

Times = dict[str, list[float]]


def answered_ok(answer: str) -> bool:
    return answer.strip() == "ok"


def one_run(bench: Bench, agent: Agent, rounds: int) -> Times:
    """Call times by caller, for one run of every caller taking turns."""
    config = bench_config(bench.state_dir("overhead"), agent, performance__max_concurrent=1)

    with contextlib.ExitStack() as stack:
        supervisor = stack.enter_context(running_supervisor(config))
        asyncio_caller = AsyncioCaller(agent)
        stack.callback(asyncio_caller.close)
        worker_like = WorkerLikeRunner(config, agent)
        stack.callback(worker_like.close)

        callers: dict[str, Callable[[str], str | Timed]] = {
            RUN: subprocess_run_caller(agent),
            ASYNCIO: asyncio_caller,
            RUNNER: runner_caller(config, agent),
            ADAPTER: adapter_caller(QChatAdapter(config)),
            WORKER_LIKE: worker_like.caller(),
            SUPERVISOR: supervisor_caller(supervisor),
        }

        # A few calls first, untimed: imports, caches and the page cache warm.
        warmup = 3 if rounds >= 30 else 1 if rounds >= 5 else 0
        interleave(callers, warmup, PROMPT.format, check=answered_ok)
        return interleave(callers, rounds, PROMPT.format, check=answered_ok)


def run(bench: Bench) -> list[Row]:
    rows: list[Row] = []
    plan = bench.plan
    sizes = {
        ZERO: (bench.zero, plan.overhead_rounds_zero, plan.overhead_reps_zero),
        SIM: (bench.simulator, plan.overhead_rounds_sim, plan.overhead_reps_sim),
    }
    for label, (agent, rounds, reps) in sizes.items():
        if agent is None:
            rows += [
                not_measured(GROUP, name, goal_of(name), bench.zero_note)
                for name, _, _ in FIGURES[label]
            ]
            continue

        runs = []
        for rep in range(reps):
            bench.progress(f"overhead: {label}, {rounds} calls each, run {rep + 1} of {reps}")
            runs.append(one_run(bench, agent, rounds))
        if label == ZERO:
            bench.series["zero_agent_calls"] = runs[0]
        rows += rows_for(label, runs)
    return rows


def goal_of(name: str) -> Goal | None:
    return HOP_GOAL if name.startswith("supervisor's own hop") else None


def rows_for(label: str, runs: list[Times]) -> list[Row]:
    def p50(caller: str) -> list[float]:
        return [percentile(times[caller], 0.50) for times in runs]

    def p99(caller: str) -> list[float]:
        return [percentile(times[caller], 0.99) for times in runs]

    def signed(seconds: float) -> str:
        return duration(seconds, signed=True)

    rows = []
    for name, minuend, subtrahend in FIGURES[label]:
        median_gap = Spread.of([a - b for a, b in zip(p50(minuend), p50(subtrahend), strict=True)])
        tail_gap = Spread.of([a - b for a, b in zip(p99(minuend), p99(subtrahend), strict=True)])
        base = Spread.of(p50(subtrahend)).median
        rows.append(
            Row(
                GROUP,
                name,
                goal_of(name),
                f"p50 {spread_text(median_gap, signed)}, p99 {signed(tail_gap.median)} "
                f"({subtrahend} p50 {duration(base)})",
                median_gap.median,
                median_gap,
                data={
                    "p50_difference_s": median_gap.as_dict(),
                    "p99_difference_s": tail_gap.as_dict(),
                    "p50_s_by_caller": {caller: p50(caller) for caller in runs[0]},
                    "p99_s_by_caller": {caller: p99(caller) for caller in runs[0]},
                    "calls_per_caller_per_run": len(runs[0][minuend]),
                },
            )
        )
    return rows
