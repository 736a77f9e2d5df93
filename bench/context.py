"""The run's sizes (smoke, quick, full) and what every scenario shares.

Sizes are chosen for a 2-core machine: full takes about 12 minutes, quick
under two, smoke a few seconds (its figures mean nothing; it proves that
every scenario starts, runs and reports).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.agents import SIMULATOR, Agent, fresh_dir


@dataclass(frozen=True)
class Plan:
    """How long and how often each scenario measures."""

    mode: str

    # Deployment: each profile's run lasts warm-up + seconds, `reps` times.
    deploy_seconds: float
    deploy_warmup: float
    deploy_reps: int
    availability_seconds: float
    kill_interval: float

    # Appended to the simulator's profile prompts: a smoke run shortens the
    # profiles' latency ("@sim:latency=0.01") to finish in seconds.
    sim_latency_directive: str

    # Overhead: calls per caller per run, and runs, for each agent.
    overhead_rounds_zero: int
    overhead_reps_zero: int
    overhead_rounds_sim: int
    overhead_reps_sim: int

    # Throughput at 10 and 20 calls of 200 ms: per method and concurrency.
    throughput_seconds: float
    throughput_warmup: float
    throughput_reps_zero: int
    throughput_reps_sim: int
    throughput_with_simulator: bool

    # A 5 MiB answer: calls per caller per run, and runs.
    large_rounds_zero: int
    large_rounds_sim: int
    large_reps: int

    # Cache hits and breaker refusals: calls per run, and runs.
    fast_path_calls: int
    fast_path_reps: int

    kill_samples: int
    idle_seconds: float


PLANS = {
    "full": Plan(
        mode="full",
        deploy_seconds=45,
        deploy_warmup=3,
        deploy_reps=2,
        availability_seconds=90,
        kill_interval=10.0,
        sim_latency_directive="",
        overhead_rounds_zero=300,
        overhead_reps_zero=5,
        overhead_rounds_sim=30,
        overhead_reps_sim=3,
        throughput_seconds=5,
        throughput_warmup=1,
        throughput_reps_zero=3,
        throughput_reps_sim=2,
        throughput_with_simulator=True,
        large_rounds_zero=15,
        large_rounds_sim=8,
        large_reps=3,
        fast_path_calls=2000,
        fast_path_reps=5,
        kill_samples=20,
        idle_seconds=30,
    ),
    "quick": Plan(
        mode="quick",
        deploy_seconds=6,
        deploy_warmup=1,
        deploy_reps=1,
        availability_seconds=12,
        kill_interval=3.0,
        sim_latency_directive="",
        overhead_rounds_zero=100,
        overhead_reps_zero=2,
        overhead_rounds_sim=8,
        overhead_reps_sim=1,
        throughput_seconds=2,
        throughput_warmup=0.5,
        throughput_reps_zero=1,
        throughput_reps_sim=1,
        throughput_with_simulator=True,
        large_rounds_zero=5,
        large_rounds_sim=3,
        large_reps=2,
        fast_path_calls=500,
        fast_path_reps=3,
        kill_samples=8,
        idle_seconds=10,
    ),
    "smoke": Plan(
        mode="smoke",
        deploy_seconds=1,
        deploy_warmup=0.2,
        deploy_reps=1,
        availability_seconds=1.5,
        kill_interval=1.0,
        sim_latency_directive="@sim:latency=0.01",
        overhead_rounds_zero=5,
        overhead_reps_zero=1,
        overhead_rounds_sim=2,
        overhead_reps_sim=1,
        throughput_seconds=0.4,
        throughput_warmup=0.1,
        throughput_reps_zero=1,
        throughput_reps_sim=1,
        throughput_with_simulator=False,
        large_rounds_zero=2,
        large_rounds_sim=1,
        large_reps=1,
        fast_path_calls=20,
        fast_path_reps=1,
        kill_samples=2,
        idle_seconds=1,
    ),
}


@dataclass
class Bench:
    """What the scenarios share: sizes, agents, a scratch directory, plot data."""

    plan: Plan
    work_dir: Path
    zero: Agent | None
    zero_note: str
    series: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    simulator: Agent = SIMULATOR

    def progress(self, message: str) -> None:
        """A line on stderr, so that a long run shows where it is."""
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:5.0f} s] {message}", file=sys.stderr, flush=True)

    def state_dir(self, name: str) -> Path:
        """A fresh state directory: no breaker, cache or limit carried over."""
        return fresh_dir(self.work_dir, name)

    def agents(self) -> list[Agent]:
        """The zero-latency agent first (when it was built), then the simulator."""
        return [agent for agent in (self.zero, self.simulator) if agent is not None]
