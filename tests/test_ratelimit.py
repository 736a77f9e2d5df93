"""The rate limit: bucket arithmetic, deadlines, and one budget across processes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import captured_logs

from ralph_supervisor.errors import QChatTimeout
from ralph_supervisor.ratelimit import RateLimiter

CHILD_TIMEOUT = 30.0


def limits(requests_per_minute: float | None = 60.0, burst: int | None = 3) -> Any:
    return types.SimpleNamespace(requests_per_minute=requests_per_minute, burst=burst)


class FakeTime:
    """A clock and a sleep that moves it, so no test waits for real."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    with captured_logs("ralph_supervisor.ratelimit") as records:
        yield records


@pytest.mark.parametrize("shared", [True, False])
def test_bucket_arithmetic(tmp_path: Path, shared: bool):
    fake = FakeTime()
    limiter = RateLimiter(limits(60, 3), tmp_path if shared else None, clock=fake.clock)

    # A full bucket: burst calls start at once.
    assert [limiter.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]

    # Then one a second; asking does not take.
    assert limiter.reserve() == pytest.approx(1.0)
    assert limiter.reserve() == pytest.approx(1.0)
    fake.now += 0.25
    assert limiter.reserve() == pytest.approx(0.75)
    fake.now += 0.75
    assert limiter.reserve() == 0.0
    assert limiter.reserve() == pytest.approx(1.0)

    # A long pause refills no more than burst.
    fake.now += 3600
    assert [limiter.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.reserve() > 0

    assert (tmp_path / "ratelimit" / "default").exists() is shared


def test_burst_defaults_to_one_minutes_worth(tmp_path: Path):
    assert RateLimiter(limits(30, None), tmp_path).capacity == 30
    assert RateLimiter(limits(0.5, None), tmp_path).capacity == 1

    fake = FakeTime()
    slow = RateLimiter(limits(0.5, None), tmp_path, name="slow", clock=fake.clock)
    assert slow.reserve() == 0.0
    assert slow.reserve() == pytest.approx(120.0)


def test_no_limit_costs_nothing(tmp_path: Path):
    limiter = RateLimiter(limits(None, None), tmp_path)
    assert all(limiter.reserve() == 0.0 for _ in range(1000))
    assert limiter.acquire(deadline=time.monotonic()) == 0.0
    assert not (tmp_path / "ratelimit").exists()
    assert limiter.stats()["unlimited"]


def test_a_clock_that_steps_back_does_not_stall_the_bucket(tmp_path: Path):
    fake = FakeTime()
    limiter = RateLimiter(limits(60, 1), tmp_path, clock=fake.clock)
    assert limiter.reserve() == 0.0
    fake.now -= 3600
    assert limiter.reserve() == pytest.approx(1.0)
    fake.now += 1.0
    assert limiter.reserve() == 0.0


def test_acquire_sleeps_until_a_token_and_counts_the_wait(tmp_path: Path):
    fake = FakeTime()
    limiter = RateLimiter(limits(60, 1), tmp_path, clock=fake.clock, sleep=fake.sleep)
    assert limiter.acquire(None) == 0.0
    limiter.acquire(None)
    assert fake.slept == [pytest.approx(1.0)]
    stats = limiter.stats()
    assert stats["waits"] == 1
    assert stats["timeouts"] == 0


def test_acquire_in_real_time(tmp_path: Path):
    limiter = RateLimiter(limits(600, 1), tmp_path)
    assert limiter.acquire(time.monotonic() + 5) == 0.0
    started = time.monotonic()
    waited = limiter.acquire(time.monotonic() + 5)
    elapsed = time.monotonic() - started
    assert 0.05 < waited <= elapsed < 1.0
    assert limiter.waited_seconds_total == pytest.approx(waited)
    assert limiter.waits == 1


def test_acquire_raises_at_once_when_no_token_comes_before_the_deadline(tmp_path: Path):
    limiter = RateLimiter(limits(6, 1), tmp_path)
    limiter.acquire(None)

    started = time.monotonic()
    with pytest.raises(QChatTimeout) as timeout:
        limiter.acquire(deadline=time.monotonic() + 2.0)
    assert time.monotonic() - started < 0.5
    error = timeout.value
    assert "rate limit: no call slot before the deadline" in str(error)
    assert error.trips_breaker is False
    assert error.retry_after == pytest.approx(10.0, abs=0.5)
    assert limiter.stats()["timeouts"] == 1

    # It survives the trip from a worker to the parent.
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert copy.trips_breaker is False and copy.rate_limited


@pytest.mark.parametrize("how", ["below a file", "corrupt"])
def test_an_unusable_directory_falls_back_to_a_bucket_here(
    tmp_path: Path, how: str, logs: list[logging.LogRecord]
):
    if how == "below a file":
        # Tests run as root, where chmod does not stop writes.
        (tmp_path / "file").write_text("")
        state_dir = tmp_path / "file" / "state"
    else:
        state_dir = tmp_path / "state"
        directory = state_dir / "ratelimit" / "default"
        directory.mkdir(parents=True)
        (directory / "cache.db").write_bytes(b"garbage " * 500)

    fake = FakeTime()
    limiter = RateLimiter(limits(60, 2), state_dir, clock=fake.clock)
    assert [limiter.reserve() for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert limiter.reserve() > 0

    warnings = [r for r in logs if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "falls back to a bucket in this process" in warnings[0].getMessage()
    assert limiter.degraded_reason is not None
    assert limiter.stats()["shared"] is False


def test_bad_settings_are_refused(tmp_path: Path):
    with pytest.raises(ValueError):
        RateLimiter(limits(0, None), tmp_path)
    with pytest.raises(ValueError):
        RateLimiter(limits(60, 0), tmp_path)
    with pytest.raises(ValueError):
        RateLimiter(limits(60, 1), tmp_path, name="../x")


CHILD = textwrap.dedent(
    """
    import json, pathlib, sys, time, types

    from ralph_supervisor.errors import QChatTimeout
    from ralph_supervisor.ratelimit import RateLimiter

    args = json.loads(sys.argv[1])
    limiter = RateLimiter(
        types.SimpleNamespace(requests_per_minute=args["rpm"], burst=args["burst"]),
        pathlib.Path(args["state_dir"]),
    )
    pathlib.Path(args["ready"]).write_text("")

    go = pathlib.Path(args["go"])
    give_up = time.monotonic() + 20
    while not go.exists() or not go.read_text():
        if time.monotonic() > give_up:
            sys.exit("the go file never came")
        time.sleep(0.002)
    start = float(go.read_text())
    time.sleep(max(0.0, start - time.time()))

    # Until the end time: each acquire that would end after it stops the loop.
    end_mono = time.monotonic() + (start + args["duration"] - time.time())
    starts = []
    while True:
        try:
            limiter.acquire(deadline=end_mono)
        except QChatTimeout:
            break
        starts.append(time.time())
    print(json.dumps({"starts": starts, "stats": limiter.stats()}))
    """
)


def test_two_processes_share_one_budget(tmp_path: Path):
    rpm, burst, duration = 60, 5, 3.0
    go = tmp_path / "go"
    processes = []
    try:
        for index in range(2):
            ready = tmp_path / f"ready-{index}"
            args = {
                "rpm": rpm,
                "burst": burst,
                "state_dir": str(tmp_path / "state"),
                "ready": str(ready),
                "go": str(go),
                "duration": duration,
            }
            process = subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(args)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            processes.append((process, ready))

        give_up = time.monotonic() + CHILD_TIMEOUT
        for process, ready in processes:
            while not ready.exists():
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < give_up, "children never became ready"
                time.sleep(0.005)
        start = time.time() + 0.2
        go.write_text(repr(start))

        starts: list[float] = []
        for process, _ in processes:
            out, err = process.communicate(timeout=CHILD_TIMEOUT)
            assert process.returncode == 0, err
            starts.extend(json.loads(out.strip().splitlines()[-1])["starts"])
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    starts.sort()
    elapsed = starts[-1] - start
    allowed = burst + rpm / 60.0 * elapsed + 1
    print(f"\ntwo processes, {rpm}/min burst {burst}: {len(starts)} calls in {elapsed:.2f} s")
    assert len(starts) <= allowed
    # The budget was used, burst and refills both (7 when nothing is late).
    assert len(starts) >= burst + 1
