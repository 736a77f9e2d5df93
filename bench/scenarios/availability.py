"""Availability with injected faults: agent crashes, agent hangs, workers killed.

    10 workers, 10 callers, "@sim:profile=simple" prompts
    the simulator draws a fault per attempt (no seed: a retry draws again):
        crash_rate 0.05   exit 1, a Rust-style panic (101), or SIGKILL
        hang_rate 0.005   a hang that ignores SIGTERM, until the deadline
    the benchmark SIGKILLs the worker of a call in flight every few seconds

The supervisor's defaults do the rest: 3 retries with full-jitter backoff
from 1 s, all within one deadline per call. adapter.timeout is 10 s here
(the default, 120 s, would let each hang hold a worker for two minutes),
and adapter.attempt_timeout 2.5 s: a hung attempt ends in time for a retry
(without it, every hang used the whole deadline and the call was lost).
Every answer is `@sim:echo=sha256` of its prompt, so "answered correctly"
is checked byte for byte, not taken on trust.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import signal
import threading
import time
import uuid
from typing import Any

from bench.agents import bench_config
from bench.callers import Sample, closed_loop, running_supervisor, supervisor_caller
from bench.context import Bench
from bench.report import Goal, Row

GROUP = "deployment targets (simulator, realistic latency)"
ROW = "availability, injected faults (with retries)"
ROWS = (ROW,)

GOAL = Goal("> 99.9 % answered correctly", ">", 99.9)

WORKERS = 10
CRASH_RATE = 0.05
HANG_RATE = 0.005
TIMEOUT_S = 10.0
ATTEMPT_TIMEOUT_S = 2.5


def expected_answer(prompt: str) -> str:
    payload = prompt.encode("utf-8")
    return f"sha256:{hashlib.sha256(payload).hexdigest()} bytes:{len(payload)}"


def kill_busy_workers(
    supervisor: Any, interval: float, stop: threading.Event, killed: list[int]
) -> None:
    """Every `interval` seconds, SIGKILL the worker of one call in flight."""
    while not stop.wait(interval):
        busy = [w["pid"] for w in supervisor.stats()["workers"] if w["state"] == "busy"]
        if not busy:
            continue
        victim = random.choice(busy)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(victim)


def run(bench: Bench) -> list[Row]:
    seconds = bench.plan.availability_seconds
    interval = bench.plan.kill_interval
    bench.progress(
        f"availability: {seconds:.0f} s, crash_rate {CRASH_RATE}, hang_rate {HANG_RATE}, "
        f"a worker killed every {interval:.1f} s"
    )

    config = bench_config(
        bench.state_dir("availability"),
        bench.simulator,
        performance__max_concurrent=WORKERS,
        adapter__timeout=TIMEOUT_S,
        adapter__attempt_timeout=ATTEMPT_TIMEOUT_S,
    )
    token = uuid.uuid4().hex[:8]

    def prompt_for(client: int, count: int) -> str:
        return (
            f"@sim:profile=simple {bench.plan.sim_latency_directive} @sim:echo=sha256 "
            f"@sim:crash_rate={CRASH_RATE} @sim:hang_rate={HANG_RATE} "
            f"fix the failing test ({token}-{client}-{count})"
        )

    def correct(prompt: str, answer: str) -> bool:
        return answer.strip() == expected_answer(prompt)

    killed: list[int] = []
    stop = threading.Event()
    with running_supervisor(config) as supervisor:
        killer = threading.Thread(
            target=kill_busy_workers,
            args=(supervisor, interval, stop, killed),
            name="bench-killer",
        )
        started = time.monotonic()
        killer.start()
        try:
            call = supervisor_caller(supervisor, use_cache=True)
            samples = closed_loop(call, WORKERS, seconds, prompt_for, check=correct)
        finally:
            stop.set()
            killer.join()
        stats = supervisor.stats()

    bench.series["completions_faults"] = [s.ended - started for s in samples if s.ok]
    return [row_from(samples, killed, stats, interval)]


def row_from(
    samples: list[Sample], killed: list[int], stats: dict[str, Any], interval: float
) -> Row:
    answered = sum(1 for s in samples if s.ok)
    failures = collections.Counter(s.error for s in samples if not s.ok)
    percent = 100.0 * answered / len(samples) if samples else float("nan")
    causes = ", ".join(f"{count} {name}" for name, count in failures.most_common())
    return Row(
        GROUP,
        ROW,
        GOAL,
        f"{percent:.2f} % ({answered} of {len(samples)}"
        + (f"; failed: {causes})" if causes else ")"),
        percent,
        data={
            "calls": len(samples),
            "answered_correctly": answered,
            "failures_by_error": dict(failures),
            "crash_rate": CRASH_RATE,
            "hang_rate": HANG_RATE,
            "adapter_timeout_s": TIMEOUT_S,
            "workers_killed": len(killed),
            "kill_interval_s": interval,
            "retries": stats.get("retries"),
            "worker_restarts": stats.get("worker_restarts"),
        },
        note=f"crash_rate {CRASH_RATE}, hang_rate {HANG_RATE} per attempt, "
        f"{len(killed)} busy workers SIGKILLed; 3 retries within a {TIMEOUT_S:.0f} s deadline",
    )
