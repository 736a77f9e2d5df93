"""Calls that start no process: a cache hit, and a refusal by an open breaker.

Cache hit: one call primes the cache (the default, on disk in the state
directory), then the same prompt is asked again and again. Through
CachedAdapter the hit is a hash and one read; through Supervisor it is
answered in submit(), in the caller's thread, before any queue.

Breaker refusal: a breaker with fail_max 3 (disk storage, the default) is
opened by three calls that fail with the simulator's service error; then
every call is refused with CircuitOpen until reset_timeout (an hour here).
Through Supervisor the refusal comes after the cache lookup, as it does
for users; through QChatAdapter from admit().
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.agents import bench_config
from bench.callers import running_supervisor
from bench.context import Bench
from bench.report import Goal, Row, duration, spread_text
from bench.stats import Spread, percentile
from ralph_supervisor.adapter import CachedAdapter, QChatAdapter
from ralph_supervisor.errors import CircuitOpen

GROUP = "what the supervisor adds: calls that start no process"

ROW_HIT_ADAPTER = "cache hit, CachedAdapter"
ROW_HIT_SUPERVISOR = "cache hit, Supervisor"
ROW_OPEN_SUPERVISOR = "call refused by an open breaker, Supervisor"
ROW_OPEN_ADAPTER = "call refused by an open breaker, QChatAdapter"
ROWS = (ROW_HIT_ADAPTER, ROW_HIT_SUPERVISOR, ROW_OPEN_SUPERVISOR, ROW_OPEN_ADAPTER)

HIT_GOAL = Goal("<= 100 µs at p50", "<=", 100e-6)
REFUSAL_GOAL = Goal("<= 1 ms at p50", "<=", 1e-3)

FAILING_PROMPT = "@sim:profile=instant @sim:failure=service fail {}"
FAIL_MAX = 3


def timed_calls(call: Callable[[int], None], count: int) -> list[float]:
    times = []
    for index in range(count):
        started = time.perf_counter()
        call(index)
        times.append(time.perf_counter() - started)
    return times


def cache_hits(bench: Bench, reps: int, count: int) -> dict[str, list[list[float]]]:
    agent = bench.zero or bench.simulator
    prompt = "@sim:profile=instant the same question"
    found: dict[str, list[list[float]]] = {ROW_HIT_ADAPTER: [], ROW_HIT_SUPERVISOR: []}

    adapter = CachedAdapter(QChatAdapter(bench_config(bench.state_dir("hit"), agent)))
    adapter.execute(prompt)

    def adapter_hit(index: int) -> None:
        if not adapter.execute(prompt).cached:
            raise AssertionError("CachedAdapter missed a cached prompt")

    config = bench_config(bench.state_dir("hit"), agent, performance__max_concurrent=1)
    with running_supervisor(config) as supervisor:
        supervisor.execute(prompt)

        def supervisor_hit(index: int) -> None:
            if not supervisor.execute(prompt).cached:
                raise AssertionError("Supervisor missed a cached prompt")

        for _ in range(reps):
            found[ROW_HIT_ADAPTER].append(timed_calls(adapter_hit, count))
            found[ROW_HIT_SUPERVISOR].append(timed_calls(supervisor_hit, count))
    return found


def refusals(bench: Bench, reps: int, count: int) -> dict[str, list[list[float]]]:
    overrides: dict[str, Any] = {
        "breaker__fail_max": FAIL_MAX,
        "breaker__reset_timeout": 3600,
        "adapter__max_retries": 0,
    }
    found: dict[str, list[list[float]]] = {ROW_OPEN_SUPERVISOR: [], ROW_OPEN_ADAPTER: []}

    def refused(call: Callable[[str], Any]) -> Callable[[int], None]:
        def attempt(index: int) -> None:
            try:
                call(f"@sim:profile=instant refused {index}")
            except CircuitOpen:
                return
            raise AssertionError("an open breaker let a call through")

        return attempt

    adapter = QChatAdapter(bench_config(bench.state_dir("open"), bench.simulator, **overrides))
    open_breaker(adapter.execute)

    config = bench_config(
        bench.state_dir("open"), bench.simulator, performance__max_concurrent=1, **overrides
    )
    with running_supervisor(config) as supervisor:
        open_breaker(supervisor.execute)
        for _ in range(reps):
            found[ROW_OPEN_SUPERVISOR].append(timed_calls(refused(supervisor.execute), count))
            found[ROW_OPEN_ADAPTER].append(timed_calls(refused(adapter.execute), count))
    return found


def open_breaker(call: Callable[[str], Any]) -> None:
    """Fail calls until the breaker refuses one (at most a few more than fail_max)."""
    for index in range(FAIL_MAX + 3):
        try:
            call(FAILING_PROMPT.format(index))
        except CircuitOpen:
            return
        except Exception:
            continue
    raise RuntimeError(f"the breaker did not open after {FAIL_MAX + 3} failed calls")


def run(bench: Bench) -> list[Row]:
    plan = bench.plan
    bench.progress(
        f"cache hits and breaker refusals: {plan.fast_path_reps} x "
        f"{plan.fast_path_calls} calls each"
    )
    found = cache_hits(bench, plan.fast_path_reps, plan.fast_path_calls)
    found.update(refusals(bench, plan.fast_path_reps, plan.fast_path_calls))

    goals = {
        ROW_HIT_ADAPTER: HIT_GOAL,
        ROW_HIT_SUPERVISOR: HIT_GOAL,
        ROW_OPEN_SUPERVISOR: REFUSAL_GOAL,
        ROW_OPEN_ADAPTER: REFUSAL_GOAL,
    }
    rows = []
    for name in ROWS:
        runs = found[name]
        p50 = Spread.of([percentile(times, 0.5) for times in runs])
        p99 = Spread.of([percentile(times, 0.99) for times in runs])
        rows.append(
            Row(
                GROUP,
                name,
                goals[name],
                f"p50 {spread_text(p50, duration)}, p99 {duration(p99.median)}",
                p50.median,
                p50,
                data={"p99_s": p99.as_dict(), "calls_per_run": len(runs[0])},
            )
        )
    return rows
