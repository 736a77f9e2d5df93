"""Deployment targets: one supervisor under a realistic load of the simulator.

    simple:  10 workers, 10 callers, "@sim:profile=simple"  (median 0.3 s)
    complex: 20 workers, 20 callers, "@sim:profile=complex" (median 1.2 s)

Each caller is a thread that submits its next call as soon as the last one
returns, so 10 (or 20) calls are in flight the whole time: the concurrency
the deployment guide promises. Every prompt is new, so the cache (on, as by
default) misses and stores every time, as it would for a loop's fresh
prompts. The first seconds (warm-up) are left out of every figure.

During the measured window the sampler reads the process tree's memory
every second and stats()'s calls in flight ten times a second; the CPU of
the tree is read at both ends of the window.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench.agents import bench_config
from bench.callers import (
    Sample,
    closed_loop,
    completed_between,
    running_supervisor,
    window_rate,
)
from bench.context import Bench
from bench.processes import MB, CpuUse, TreeSampler, cpu_between, snapshot_cpu
from bench.report import Goal, Row, spread_text
from bench.stats import Spread, percentile, summarize

GROUP = "deployment targets (simulator, realistic latency)"

ROW_P50 = "latency p50, simple prompts"
ROW_P99 = "latency p99, complex prompts"
ROW_THROUGHPUT = "throughput, one instance"
ROW_CONCURRENCY = "concurrency, requests at once"
ROW_MEMORY = "memory, whole process tree"
ROW_CPU = "CPU, supervisor's own processes"
ROW_ERRORS = "error rate, no injected faults"

ROWS = (ROW_P50, ROW_P99, ROW_THROUGHPUT, ROW_CONCURRENCY, ROW_MEMORY, ROW_CPU, ROW_ERRORS)

GOAL_P50 = Goal("< 500 ms", "<", 0.5)
GOAL_P99 = Goal("< 2000 ms", "<", 2.0)
GOAL_THROUGHPUT = Goal(">= 100 requests/min", ">=", 100.0)
GOAL_CONCURRENCY = Goal("10 to 20 at once", ">=", 20.0)
GOAL_MEMORY = Goal("< 500 MB", "<", 500.0)
GOAL_CPU = Goal("< 50 % on average", "<", 50.0)
GOAL_ERRORS = Goal("< 0.1 %", "<", 0.1)


@dataclass(frozen=True)
class Workload:
    profile: str
    workers: int


WORKLOADS = (Workload("simple", 10), Workload("complex", 20))


@dataclass
class LoadRun:
    """One run of one workload, and what was measured around it."""

    workload: Workload
    samples: list[Sample]
    measured: list[Sample]
    agent_s: dict[str, float]
    window_s: float
    answered_per_s: float
    completed_in_window: int
    cpu: CpuUse
    peak_rss_mb: float
    peak_pss_mb: float
    peak_in_flight: float
    started: float
    end_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def rate_per_min(self) -> float:
        return 60.0 * self.answered_per_s

    @property
    def failures(self) -> int:
        return sum(1 for s in self.samples if not s.ok)


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def worker_pids(supervisor: Any) -> list[int]:
    return [w["pid"] for w in supervisor.stats()["workers"] if w.get("pid")]


def load_run(bench: Bench, workload: Workload) -> LoadRun:
    """Run one workload at full concurrency and measure the window after warm-up."""
    plan = bench.plan
    config = bench_config(
        bench.state_dir(f"deploy-{workload.profile}"),
        bench.simulator,
        performance__max_concurrent=workload.workers,
    )
    token = uuid.uuid4().hex[:8]

    directives = f"@sim:profile={workload.profile} {plan.sim_latency_directive}".strip()

    def prompt_for(client: int, count: int) -> str:
        return f"{directives} fix the failing test ({token}-{client}-{count})"

    def answered(prompt: str, answer: str) -> bool:
        return bool(answer.strip())

    samples: list[Sample] = []
    agent_s: dict[str, float] = {}
    root = os.getpid()
    with running_supervisor(config) as supervisor:

        def probe() -> dict[str, float]:
            return {"in_flight": float(supervisor.stats()["in_flight"])}

        def call(prompt: str) -> str:
            # The agent's own time, to tell it from the supervisor's share.
            response = supervisor.execute(prompt)
            agent_s[prompt] = response.duration_s
            return str(response.text)

        def load() -> None:
            total = plan.deploy_warmup + plan.deploy_seconds
            samples.extend(closed_loop(call, workload.workers, total, prompt_for, check=answered))

        with TreeSampler(root, probe=probe) as sampler:
            started = time.monotonic()
            callers = threading.Thread(target=load, name="bench-load")
            callers.start()

            # The window: CPU of the tree at both ends, minus what the
            # benchmark's own threads (sampler, this one) spent meanwhile.
            window_start = started + plan.deploy_warmup
            window_end = window_start + plan.deploy_seconds
            sleep_until(window_start)
            own_before = time.thread_time()
            sampler_before = sampler.cpu_so_far
            before = snapshot_cpu(root, worker_pids(supervisor))
            sleep_until(window_end)
            after = snapshot_cpu(root, worker_pids(supervisor))
            not_ours = (time.thread_time() - own_before) + (sampler.cpu_so_far - sampler_before)

            callers.join()
        end_stats = supervisor.stats()

    measured = [s for s in samples if s.started >= window_start]
    return LoadRun(
        workload=workload,
        samples=samples,
        measured=measured,
        agent_s=agent_s,
        window_s=plan.deploy_seconds,
        answered_per_s=window_rate(samples, window_start, window_end),
        completed_in_window=completed_between(samples, window_start, window_end),
        cpu=cpu_between(before, after, not_ours_s=not_ours),
        peak_rss_mb=sampler.peak_rss / MB,
        peak_pss_mb=sampler.peak_pss / MB,
        peak_in_flight=sampler.peaks.get("in_flight", 0.0),
        started=started,
        end_stats={k: end_stats.get(k) for k in ("completed", "failed", "retries")},
    )


def run(bench: Bench) -> list[Row]:
    runs: list[LoadRun] = []
    for rep in range(bench.plan.deploy_reps):
        for workload in WORKLOADS:
            bench.progress(
                f"deployment: {workload.profile}, {workload.workers} at once, "
                f"run {rep + 1} of {bench.plan.deploy_reps}"
            )
            runs.append(load_run(bench, workload))

    keep_series(bench, runs)
    return rows_from(runs)


def keep_series(bench: Bench, runs: list[LoadRun]) -> None:
    """Latencies and completion times, for the plot."""
    for workload in WORKLOADS:
        mine = [r for r in runs if r.workload == workload]
        bench.series[f"latency_{workload.profile}"] = [
            s.latency for r in mine for s in r.measured if s.ok
        ]
        first = mine[0]
        bench.series[f"completions_{workload.profile}"] = [
            s.ended - first.started for s in first.samples if s.ok
        ]


def supervisor_share(run: LoadRun) -> list[float]:
    """Per call: wall time in the caller minus the agent's time (Response.duration_s)."""
    return [
        s.latency - run.agent_s[s.prompt] for s in run.measured if s.ok and s.prompt in run.agent_s
    ]


def run_details(run: LoadRun) -> dict[str, Any]:
    latencies = [s.latency for s in run.measured if s.ok]
    return {
        "profile": run.workload.profile,
        "workers": run.workload.workers,
        "callers": run.workload.workers,
        "calls": len(run.samples),
        "failures": run.failures,
        "errors": sorted({s.error for s in run.samples if s.error}),
        "latency_s": summarize(latencies),
        "agent_s": summarize(
            [run.agent_s[s.prompt] for s in run.measured if s.prompt in run.agent_s]
        ),
        "supervisor_share_s": summarize(supervisor_share(run)),
        "requests_per_min": round(run.rate_per_min, 1),
        "completed_in_window": run.completed_in_window,
        "window_s": run.window_s,
        "cpu": run.cpu.as_dict(),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "peak_pss_mb": round(run.peak_pss_mb, 1),
        "peak_in_flight": run.peak_in_flight,
        "supervisor_stats_at_end": run.end_stats,
    }


def rows_from(runs: list[LoadRun]) -> list[Row]:
    simple = [r for r in runs if r.workload.profile == "simple"]
    complex_ = [r for r in runs if r.workload.profile == "complex"]

    def latency_spread(group: list[LoadRun], fraction: float) -> Spread:
        return Spread.of(
            [percentile([s.latency for s in r.measured if s.ok], fraction) for r in group]
        )

    def share(group: list[LoadRun], fraction: float) -> float:
        return Spread.of([percentile(supervisor_share(r), fraction) for r in group]).median

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.0f} ms"

    details = {"runs": [run_details(r) for r in runs]}
    rows = []

    # Beside each latency: the part of it that is not the agent's own time
    # (Response.duration_s), so that a slow agent is told from a slow hop.
    p50 = latency_spread(simple, 0.50)
    rows.append(
        Row(
            GROUP,
            ROW_P50,
            GOAL_P50,
            f"{spread_text(p50, ms)} (10 at once; the supervisor's share "
            f"p50 {ms(share(simple, 0.50))})",
            p50.median,
            p50,
            data=details,
        )
    )

    p99 = latency_spread(complex_, 0.99)
    rows.append(
        Row(
            GROUP,
            ROW_P99,
            GOAL_P99,
            f"{spread_text(p99, ms)} (20 at once; the supervisor's share "
            f"p99 {ms(share(complex_, 0.99))})",
            p99.median,
            p99,
        )
    )

    # Judged on the slower workload: a deployment must hold it whatever
    # its prompts are.
    rate_simple = Spread.of([r.rate_per_min for r in simple])
    rate_complex = Spread.of([r.rate_per_min for r in complex_])
    slower = min(rate_simple, rate_complex, key=lambda s: s.median)
    rows.append(
        Row(
            GROUP,
            ROW_THROUGHPUT,
            GOAL_THROUGHPUT,
            f"{rate_simple.median:.0f}/min simple (10 at once), "
            f"{rate_complex.median:.0f}/min complex (20 at once)",
            slower.median,
            slower,
        )
    )

    # Both sizes must fill every worker: 10 of 10, and 20 of 20.
    reached = all(r.peak_in_flight >= r.workload.workers for r in runs)
    peaks = ", ".join(
        f"{min(r.peak_in_flight for r in group):.0f} of {group[0].workload.workers}"
        for group in (simple, complex_)
    )
    rows.append(
        Row(
            GROUP,
            ROW_CONCURRENCY,
            GOAL_CONCURRENCY,
            f"{peaks} workers busy at once (peak, stats())",
            min(r.peak_in_flight for r in complex_),
            verdict=reached,
        )
    )

    pss = Spread.of([r.peak_pss_mb for r in runs])
    rss = Spread.of([r.peak_rss_mb for r in runs])
    rows.append(
        Row(
            GROUP,
            ROW_MEMORY,
            GOAL_MEMORY,
            f"PSS {pss.high:.0f} MB, RSS {rss.high:.0f} MB (peak, 20 workers + agents)",
            pss.high,
            pss,
            note="judged on PSS, which counts a page shared by forked workers once; "
            "RSS counts it in every worker",
        )
    )

    cpu = Spread.of([r.cpu.supervisor_percent for r in runs])
    agents = max(r.cpu.agents_percent for r in runs)
    rows.append(
        Row(
            GROUP,
            ROW_CPU,
            GOAL_CPU,
            f"{cpu.high:.0f} % of one core (busiest run; agents {agents:.0f} % more)",
            cpu.high,
            cpu,
            note="the supervisor's processes (callers' threads, loop, fork server, "
            "workers), without the agents they run; % of one core",
        )
    )

    calls = sum(len(r.samples) for r in runs)
    failures = sum(r.failures for r in runs)
    rate = 100.0 * failures / calls if calls else float("nan")
    rows.append(
        Row(GROUP, ROW_ERRORS, GOAL_ERRORS, f"{rate:.3f} % ({failures} of {calls} calls)", rate)
    )
    return rows
