"""Throughput at 10 and 20 calls of 200 ms at once, against the ideal.

    ideal = concurrency / latency: 50 calls/s at 10, 100 calls/s at 20

Three ways of keeping N calls of a 200 ms agent in flight, taking turns
within each run: a Supervisor with N workers and N caller threads; N threads
calling subprocess.run; N asyncio tasks calling create_subprocess_exec and
communicate(). Each counts the calls that end within a window after a
warm-up, a call that straddles an edge counting for its part inside (see
callers.window_rate; the plain count is in the JSON beside it).

The simulator is a Python program that takes 40-60 ms of CPU to start, so
at 20 calls of 200 ms it asks for more than two cores by itself; zero_agent
sleeps its 200 ms without that cost, so its rows show what the supervisor
alone can carry. The baselines beside each row tell the two apart. (With
the simulator on a busy machine the supervisor may beat them: each of its
agents runs in a session of its own, which the scheduler's autogroup gives
a share of the CPU of its own.)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from bench.agents import Agent, bench_config
from bench.callers import (
    Sample,
    closed_loop,
    closed_loop_asyncio,
    completed_between,
    running_supervisor,
    subprocess_run_caller,
    supervisor_caller,
    window_rate,
)
from bench.context import Bench
from bench.report import Goal, Row, not_measured
from bench.stats import Spread

GROUP = "what the supervisor adds: throughput of 200 ms calls"

LATENCY_S = 0.2
CONCURRENCIES = (10, 20)
GOAL = Goal(">= 97 % of ideal", ">=", 97.0)

AGENT_LABELS = ("simulator", "zero_agent")
ROWS = tuple(
    f"throughput, {n} x 200 ms at once ({label})" for label in AGENT_LABELS for n in CONCURRENCIES
)

SUPERVISOR, RUN, ASYNCIO = "Supervisor", "subprocess.run", "asyncio"


def rates_of(
    samples: list[Sample], started: float, warmup: float, seconds: float
) -> tuple[float, float]:
    """(calls/s counting the fractions of calls at the edges, calls/s ended within)."""
    window_start = started + warmup
    window_end = window_start + seconds
    counted = completed_between(samples, window_start, window_end) / seconds
    return window_rate(samples, window_start, window_end), counted


def measure(
    bench: Bench, agent: Agent, clients: int, reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Calls per second of each method, per run: with fractions, and counted."""
    plan = bench.plan
    total = plan.throughput_warmup + plan.throughput_seconds
    token = uuid.uuid4().hex[:8]

    def prompt_for(client: int, count: int) -> str:
        return f"@sim:latency={LATENCY_S} call ({token}-{client}-{count})"

    config = bench_config(
        bench.state_dir("throughput"), agent, performance__max_concurrent=clients
    )
    rates: dict[str, list[float]] = {SUPERVISOR: [], RUN: [], ASYNCIO: []}
    counted: dict[str, list[float]] = {SUPERVISOR: [], RUN: [], ASYNCIO: []}
    with running_supervisor(config) as supervisor:
        supervised = supervisor_caller(supervisor, use_cache=True)
        methods: dict[str, Callable[[], list[Sample]]] = {
            SUPERVISOR: lambda: closed_loop(supervised, clients, total, prompt_for),
            RUN: lambda: closed_loop(subprocess_run_caller(agent), clients, total, prompt_for),
            ASYNCIO: lambda: closed_loop_asyncio(agent, clients, total, prompt_for),
        }
        names = list(methods)
        for rep in range(reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.monotonic()
                samples = methods[name]()
                with_fractions, by_count = rates_of(
                    samples, started, plan.throughput_warmup, plan.throughput_seconds
                )
                rates[name].append(with_fractions)
                counted[name].append(by_count)
    return rates, counted


def run(bench: Bench) -> list[Row]:
    plan = bench.plan
    agents = {
        "simulator": (bench.simulator, plan.throughput_reps_sim),
        "zero_agent": (bench.zero, plan.throughput_reps_zero),
    }
    rows = []
    for label, (agent, reps) in agents.items():
        for clients in CONCURRENCIES:
            name = f"throughput, {clients} x 200 ms at once ({label})"
            if agent is None:
                rows.append(not_measured(GROUP, name, GOAL, bench.zero_note))
                continue
            if label == "simulator" and not plan.throughput_with_simulator:
                why = f"left out of a {plan.mode} run, to keep it short"
                rows.append(not_measured(GROUP, name, GOAL, why))
                continue
            bench.progress(f"throughput: {label}, {clients} at once, {reps} runs")
            rates, counted = measure(bench, agent, clients, reps)
            rows.append(row_from(name, clients, rates, counted))
    return rows


def row_from(
    name: str, clients: int, rates: dict[str, list[float]], counted: dict[str, list[float]]
) -> Row:
    ideal = clients / LATENCY_S
    percent = Spread.of([100.0 * r / ideal for r in rates[SUPERVISOR]])
    supervised = Spread.of(rates[SUPERVISOR]).median
    baselines = {n: Spread.of(rates[n]).median for n in (RUN, ASYNCIO)}
    best = max(baselines.values())
    measured = (
        f"{supervised:.1f}/s = {percent.median:.1f} % of {ideal:.0f}/s"
        + (f" [{percent.low:.1f}..{percent.high:.1f}]" if percent.runs > 1 else "")
        + f"; subprocess.run {baselines[RUN]:.1f}/s, asyncio {baselines[ASYNCIO]:.1f}/s"
    )
    return Row(
        GROUP,
        name,
        GOAL,
        measured,
        percent.median,
        percent,
        data={
            "ideal_per_s": ideal,
            "per_s_by_method": rates,
            "per_s_counted_in_window_by_method": counted,
            "supervisor_vs_best_baseline_percent": 100.0 * supervised / best if best else None,
        },
    )
