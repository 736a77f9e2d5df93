"""Soak: many quick calls, and the parent stays the same size.

Instant calls (the simulator's `instant` profile: no latency, answer `ok`)
through a Supervisor in this process. After a warm-up, the parent's resident
memory and its open file descriptors must stay flat, and no dead child may
pile up unreaped. Workers are recycled on the way (max_requests_per_worker),
so their pipes and the fork server's reaping are part of what is measured.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
from concurrent.futures import Future, wait
from pathlib import Path

import psutil
import pytest
from conftest import make_config, wait_until

from ralph_supervisor.supervisor import Supervisor

from .conftest import describe, sizes, zombie_descendants

WORKERS = 4
WARM_UP_SHARE = 0.2
RSS_GROWTH_LIMIT = 0.10


def quiet_footprint(futures: list[Future], failures: list[BaseException]) -> tuple[int, int]:
    """Resident bytes and open descriptors, with no call in flight.

    The finished futures are dropped first (their failures kept): the test's
    own list of answers must not count as the supervisor's growth.
    """
    _, not_done = wait(futures, timeout=60)
    assert not not_done, "calls did not finish"
    failures.extend(error for f in futures if (error := f.exception()) is not None)
    futures.clear()
    gc.collect()
    me = psutil.Process()
    return me.memory_info().rss, me.num_fds()


@pytest.mark.parametrize("requests", sizes(1000, 20_000, bounded_timeout=240, full_timeout=2400))
def test_memory_descriptors_and_zombies_stay_flat(tmp_path: Path, requests: int, report) -> None:
    config = make_config(
        tmp_path,
        performance__max_concurrent=WORKERS,
        adapter__timeout=30,
        supervisor__max_requests_per_worker=max(100, requests // 10),
    )
    run = uuid.uuid4().hex[:8]
    warm_up = int(requests * WARM_UP_SHARE)
    outstanding = threading.BoundedSemaphore(WORKERS * 3)
    futures: list[Future] = []
    failures: list[BaseException] = []
    peak_zombies = 0
    worker_pids: set[int] = set()
    samples: list[tuple[int, int, int]] = []  # requests done, rss, fds
    started = time.monotonic()

    with Supervisor(config) as supervisor:
        baseline: tuple[int, int] | None = None
        for index in range(requests):
            if index == warm_up:
                baseline = quiet_footprint(futures, failures)
                samples.append((index, *baseline))
            elif index > warm_up and index % max(1, requests // 10) == 0:
                samples.append((index, *quiet_footprint(futures, failures)))
                peak_zombies = max(peak_zombies, len(zombie_descendants()))
            if index % 25 == 0:
                worker_pids.update(w["pid"] for w in supervisor.stats()["workers"] if w["pid"])

            assert outstanding.acquire(timeout=60), "no call finished for 60 s"
            future = supervisor.submit(f"soak {run} call {index} @sim:profile=instant")
            future.add_done_callback(lambda _: outstanding.release())
            futures.append(future)

        final = quiet_footprint(futures, failures)
        samples.append((requests, *final))
        peak_zombies = max(peak_zombies, len(zombie_descendants()))
        stats = supervisor.stats()
    elapsed = time.monotonic() - started

    assert baseline is not None
    # Dead children are reaped promptly: none waits long after the pool stops.
    assert wait_until(lambda: not zombie_descendants(), 5), describe(zombie_descendants())

    rss_growth = (final[0] - baseline[0]) / baseline[0]
    peak_rss = max(rss for _, rss, _ in samples)
    report(
        "soak",
        requests=requests,
        ok=stats["completed"],
        failed=stats["failed"],
        calls_per_s=round(requests / elapsed, 1),
        rss_after_warm_up_mb=round(baseline[0] / 2**20, 1),
        rss_end_mb=round(final[0] / 2**20, 1),
        rss_peak_mb=round(peak_rss / 2**20, 1),
        rss_growth_pct=round(100 * rss_growth, 2),
        fds_after_warm_up=baseline[1],
        fds_end=final[1],
        fds_max=max(fds for _, _, fds in samples),
        peak_zombies=peak_zombies,
        zombies_end=len(zombie_descendants()),
        worker_pids_seen=len(worker_pids),
        seconds=round(elapsed, 1),
    )

    assert not failures, f"{len(failures)} calls failed, e.g. {failures[:3]!r}"
    assert stats["completed"] == requests
    assert rss_growth < RSS_GROWTH_LIMIT, samples
    assert final[1] <= baseline[1], samples
    assert max(fds for _, _, fds in samples) <= baseline[1] + 2, samples
    assert peak_zombies <= WORKERS
