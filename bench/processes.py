"""The process tree under the benchmark: its memory, its CPU, its leftovers.

    bench (this process: the caller threads and the supervisor loop)
      +-- fork server --+-- worker --- agent (its own session) --- ...
      |                 +-- worker --- agent
      +-- resource tracker

The supervisor's own processes are this one, the fork server, the resource
tracker and the workers; everything below a worker is an agent. Memory is
summed over the whole tree, as RSS (which counts a page shared by ten
forked workers ten times) and PSS (which splits it among them, so the sum
is what the tree really holds).

CPU comes from psutil's cpu_times, cumulative per process, in 10 ms ticks.
A process's `children_*` times hold the CPU of every descendant it has
reaped, so "self + children" summed over the live tree, taken twice, gives
the CPU of everything that ran in between, short-lived agents included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

MB = 1024 * 1024


def tree_of(root_pid: int) -> list[psutil.Process]:
    """The root and every live descendant (empty if the root is gone)."""
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@dataclass(frozen=True)
class TreeMemory:
    """Memory of a process tree, in bytes."""

    rss: int
    pss: int
    uss: int
    processes: int

    def as_dict(self) -> dict[str, float]:
        return {
            "rss_mb": round(self.rss / MB, 1),
            "pss_mb": round(self.pss / MB, 1),
            "uss_mb": round(self.uss / MB, 1),
            "processes": self.processes,
        }


def measure_memory(root_pid: int) -> TreeMemory:
    """RSS, PSS and USS summed over the tree (psutil memory_full_info)."""
    rss = pss = uss = count = 0
    for process in tree_of(root_pid):
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue  # exited between the listing and the reading
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        uss += info.uss
        count += 1
    return TreeMemory(rss, pss, uss, count)


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU seconds of a tree at one moment, split by role."""

    taken_at: float
    total: float
    agents: float


def snapshot_cpu(root_pid: int, worker_pids: Iterable[int]) -> CpuSnapshot:
    """CPU so far of everything in the tree, and of the agents below the workers.

    The agents' share is their own time while they run and, once reaped, the
    `children_*` time of the worker that reaped them.
    """
    workers = set(worker_pids)
    total = agents = 0.0
    for process in tree_of(root_pid):
        try:
            times = process.cpu_times()
            ancestors = {parent.pid for parent in process.parents()}
        except psutil.Error:
            continue
        own = times.user + times.system
        reaped = times.children_user + times.children_system
        total += own + reaped

        if process.pid in workers:
            agents += reaped
        elif ancestors & workers:
            agents += own + reaped
    return CpuSnapshot(time.monotonic(), total, agents)


@dataclass(frozen=True)
class CpuUse:
    """CPU used over an interval, as seconds and as % of one core."""

    seconds: float
    supervisor_s: float
    agents_s: float

    @property
    def supervisor_percent(self) -> float:
        return 100.0 * self.supervisor_s / self.seconds if self.seconds else 0.0

    @property
    def agents_percent(self) -> float:
        return 100.0 * self.agents_s / self.seconds if self.seconds else 0.0

    @property
    def total_percent(self) -> float:
        return self.supervisor_percent + self.agents_percent

    def as_dict(self) -> dict[str, float]:
        return {
            "interval_s": round(self.seconds, 3),
            "supervisor_cpu_s": round(self.supervisor_s, 3),
            "agents_cpu_s": round(self.agents_s, 3),
            "supervisor_percent_of_one_core": round(self.supervisor_percent, 2),
            "agents_percent_of_one_core": round(self.agents_percent, 2),
            "tree_percent_of_one_core": round(self.total_percent, 2),
        }


def cpu_between(before: CpuSnapshot, after: CpuSnapshot, *, not_ours_s: float = 0.0) -> CpuUse:
    """CPU used between two snapshots; `not_ours_s` is the benchmark's own share.

    The measuring threads run in the supervisor's process; their CPU (a
    thread clock) is taken out so that they do not count as the supervisor's.
    """
    agents = max(0.0, after.agents - before.agents)
    total = max(0.0, after.total - before.total)
    supervisor = max(0.0, total - agents - not_ours_s)
    return CpuUse(after.taken_at - before.taken_at, supervisor, agents)


@dataclass
class TreeSampler:
    """A thread that samples the tree's memory and the supervisor's load.

    `probe()` is called at every tick and may return numbers to keep the
    highest of (the number of calls in flight, read from stats()). The
    thread's own CPU so far is kept in `cpu_so_far`, to be taken out of the
    tree's: the sampler is the benchmark's work, not the supervisor's.
    """

    root_pid: int
    interval: float = 1.0
    probe: Callable[[], dict[str, float]] | None = None
    probe_interval: float = 0.1
    peak_rss: int = 0
    peak_pss: int = 0
    peaks: dict[str, float] = field(default_factory=dict)
    memory_samples: list[tuple[float, float, float]] = field(default_factory=list)
    cpu_so_far: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        started_cpu = time.thread_time()
        next_memory = time.monotonic()
        while not self._stop.is_set():
            if self.probe is not None:
                for name, value in self.probe().items():
                    self.peaks[name] = max(self.peaks.get(name, value), value)

            if time.monotonic() >= next_memory:
                memory = measure_memory(self.root_pid)
                self.peak_rss = max(self.peak_rss, memory.rss)
                self.peak_pss = max(self.peak_pss, memory.pss)
                self.memory_samples.append((time.monotonic(), memory.rss / MB, memory.pss / MB))
                next_memory = time.monotonic() + self.interval

            self.cpu_so_far = time.thread_time() - started_cpu
            self._stop.wait(self.probe_interval if self.probe else self.interval)


def multiprocessing_helpers() -> set[int]:
    """The fork server and resource tracker: they live as long as the benchmark."""
    pids: set[int] = set()
    with contextlib.suppress(Exception):
        from multiprocessing import forkserver, resource_tracker

        server_pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        tracker_pid = getattr(resource_tracker._resource_tracker, "_pid", None)
        pids.update(pid for pid in (server_pid, tracker_pid) if pid)
    return pids


def kill_leftovers(root_pid: int) -> list[str]:
    """SIGKILL every descendant but multiprocessing's helpers; say what was found.

    Every Supervisor is closed by then, and every agent reaped: anything
    still here is a leak, killed with its process group and reported.
    """
    helpers = multiprocessing_helpers()
    found = []
    for process in tree_of(root_pid)[1:]:
        if process.pid in helpers:
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append(f"{process.pid} {' '.join(process.cmdline())[:100]}")
            pgid = os.getpgid(process.pid)
        except (psutil.Error, ProcessLookupError):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid != os.getpgrp():
                os.killpg(pgid, signal.SIGKILL)
            os.kill(process.pid, signal.SIGKILL)
    return found
