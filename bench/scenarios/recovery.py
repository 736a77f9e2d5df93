"""A worker SIGKILLed, until its replacement is ready to take a call.

An idle worker is killed with SIGKILL; the benchmark then reads stats()
every half millisecond until the worker's slot shows a new pid in state
idle. The time runs from the kill to that reading, so it includes the
supervisor noticing the death (the worker's sentinel wakes its loop), the
fork server forking a new worker, and the worker's first "ready" message.

Slots are killed in turn. The restart backoff is set to 0 and the restart
intensity limit out of reach: both are there to slow a crash loop down on
purpose, and a benchmark that kills twenty workers a second is one.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from bench.agents import bench_config
from bench.callers import running_supervisor
from bench.context import Bench
from bench.report import Row, duration
from bench.stats import percentile, summarize

GROUP = "what the supervisor adds: a worker killed"
ROW = "worker SIGKILLed until its replacement is idle"
ROWS = (ROW,)

WORKERS = 4
POLL_S = 0.0005
GIVE_UP_S = 10.0


def slot_of(supervisor: Any, index: int) -> dict[str, Any]:
    for worker in supervisor.stats()["workers"]:
        if worker["slot"] == index:
            return dict(worker)
    raise LookupError(f"no slot {index}")


def kill_and_wait(supervisor: Any, index: int) -> tuple[float, float]:
    """Kill slot `index`'s worker; (seconds until noticed, until replaced and idle)."""
    old = slot_of(supervisor, index)
    if old["state"] != "idle" or not old["pid"]:
        raise RuntimeError(f"slot {index} is not idle before the kill: {old}")

    started = time.perf_counter()
    os.kill(old["pid"], signal.SIGKILL)
    noticed = None
    while time.perf_counter() - started < GIVE_UP_S:
        worker = slot_of(supervisor, index)
        if noticed is None and (worker["pid"] != old["pid"] or worker["state"] != "idle"):
            noticed = time.perf_counter() - started
        if worker["pid"] not in (None, old["pid"]) and worker["state"] == "idle":
            return noticed or 0.0, time.perf_counter() - started
        time.sleep(POLL_S)
    raise RuntimeError(f"slot {index} had no idle worker {GIVE_UP_S:.0f} s after the kill")


def run(bench: Bench) -> list[Row]:
    samples = bench.plan.kill_samples
    bench.progress(f"worker kills: {samples} SIGKILLs, {WORKERS} workers")
    config = bench_config(
        bench.state_dir("kill"),
        bench.zero or bench.simulator,
        performance__max_concurrent=WORKERS,
        supervisor__restart_backoff=0,
        supervisor__max_restarts=100_000,
        breaker__storage="memory",
        cache__enabled=False,
    )

    noticed: list[float] = []
    ready: list[float] = []
    with running_supervisor(config) as supervisor:
        for count in range(samples):
            seen, replaced = kill_and_wait(supervisor, count % WORKERS)
            noticed.append(seen)
            ready.append(replaced)

        # The replacements must work, not only say they are ready.
        answer = supervisor.execute("@sim:profile=instant after the kills", use_cache=False)
        works = answer.text.strip() != ""

    return [
        Row(
            GROUP,
            ROW,
            None,
            f"p50 {duration(percentile(ready, 0.5))}, max {duration(max(ready))} "
            f"({samples} kills; noticed after p50 {duration(percentile(noticed, 0.5))})",
            percentile(ready, 0.5),
            data={
                "ready_s": summarize(ready),
                "noticed_s": summarize(noticed),
                "poll_interval_s": POLL_S,
                "workers": WORKERS,
                "replacements_answer_a_call": works,
            },
            note="measured to within the 0.5 ms polling of stats()",
        )
    ]
