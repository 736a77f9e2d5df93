"""The circuit breaker: its life, what counts, and one circuit across processes.

Process tests run real interpreters (`python -c CHILD`) that share a state
directory. They start together on a marker file, and every wait is bounded:
a child that hangs is killed and the test fails with its output.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import reap_forked_child

from ralph_supervisor.breaker import Breaker, Ticket
from ralph_supervisor.errors import (
    CircuitOpen,
    MemoryLimitExceeded,
    OutputTooLarge,
    PromptRejected,
    QChatAuthError,
    QChatProcessError,
    QChatServiceError,
    QChatThrottled,
    QChatTimeout,
    QueueFull,
    SupervisorClosed,
    WorkerLost,
)

CHILD_TIMEOUT = 30.0


def breaker_settings(**changes: Any) -> types.SimpleNamespace:
    values: dict[str, Any] = {
        "enabled": True,
        "fail_max": 3,
        "reset_timeout": 60.0,
        "success_threshold": 1,
        "storage": "disk",
    }
    values.update(changes)
    return types.SimpleNamespace(**values)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def logs() -> Iterator[ListHandler]:
    # Our own handler: the project's logging setup may stop propagation to
    # the root logger, where caplog listens.
    logger = logging.getLogger("ralph_supervisor.breaker")
    handler = ListHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def fail(breaker: Breaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record(breaker.admit(), QChatServiceError("service unavailable"))


# ---------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_whole_life_with_an_injected_clock(tmp_path: Path, storage: str, logs: ListHandler):
    clock = FakeClock()
    breaker = Breaker(
        "q", breaker_settings(storage=storage, reset_timeout=30.0), tmp_path, clock=clock
    )
    assert breaker.state == "closed"
    assert breaker.retry_at is None

    # fail_max - 1 failures leave it closed; the next opens it.
    fail(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.fail_count == 2
    fail(breaker)
    assert breaker.state == "open"
    opened_at = clock.now
    assert breaker.retry_at == pytest.approx(opened_at + 30.0)

    with pytest.raises(CircuitOpen) as refused:
        breaker.admit()
    assert refused.value.retry_at == pytest.approx(opened_at + 30.0)
    assert "'q'" in str(refused.value) and "service_error" in str(refused.value)

    # Due, but no trial taken yet: still reported open (see Breaker's docstring).
    clock.advance(30.0)
    assert breaker.state == "open"

    trial = breaker.admit(lease_seconds=10.0)
    assert trial.trial
    assert breaker.state == "half-open"
    assert breaker.snapshot()["trial_in_progress"] is True
    for _ in range(5):
        with pytest.raises(CircuitOpen) as busy:
            breaker.admit()
        assert busy.value.retry_at is None
        assert "trial call is in progress" in str(busy.value)

    # The trial fails: open again, for another reset_timeout from now.
    clock.advance(1.0)
    breaker.record(trial, QChatThrottled("slow down"))
    assert breaker.state == "open"
    assert breaker.retry_at == pytest.approx(clock.now + 30.0)
    with pytest.raises(CircuitOpen):
        breaker.admit()

    # The next trial succeeds and closes it.
    clock.advance(30.0)
    trial = breaker.admit()
    assert trial.trial
    breaker.record(trial, None)
    assert breaker.state == "closed"
    assert breaker.fail_count == 0
    assert not breaker.admit().trial

    snapshot = breaker.snapshot()
    assert snapshot["transitions"] == 5
    assert snapshot["transitions_here"] == 5
    assert snapshot["storage"] == storage

    warnings = logs.messages(logging.WARNING)
    assert len(warnings) == 2
    assert "opened after 3 consecutive failures (last: service_error)" in warnings[0]
    assert "reopened: the trial call failed (throttled)" in warnings[1]
    infos = [r for r in logs.records if r.levelno == logging.INFO]
    assert [vars(r)["new_state"] for r in infos] == ["half-open", "half-open", "closed"]


def test_whole_life_in_real_time(tmp_path: Path):
    breaker = Breaker("q", breaker_settings(fail_max=2, reset_timeout=0.3), tmp_path)
    fail(breaker, 2)
    with pytest.raises(CircuitOpen) as refused:
        breaker.admit()
    assert 0 < refused.value.retry_at - time.time() <= 0.3

    time.sleep(0.35)
    trial = breaker.admit()
    assert trial.trial
    with pytest.raises(CircuitOpen):
        breaker.admit()
    breaker.record(trial, None)
    assert breaker.state == "closed"


def test_success_threshold_needs_that_many_trials_one_at_a_time(tmp_path: Path):
    clock = FakeClock()
    breaker = Breaker(
        "q", breaker_settings(success_threshold=2, reset_timeout=5.0), tmp_path, clock=clock
    )
    fail(breaker, 3)
    clock.advance(5.0)

    first = breaker.admit()
    with pytest.raises(CircuitOpen):
        breaker.admit()
    breaker.record(first, None)
    assert breaker.state == "half-open"

    second = breaker.admit()
    assert second.trial
    breaker.record(second, None)
    assert breaker.state == "closed"


NOT_COUNTING = [
    PromptRejected("empty prompt"),
    OutputTooLarge("too much output"),
    MemoryLimitExceeded("too much memory"),
    CircuitOpen("open", retry_at=None),
    QueueFull("queue full"),
    SupervisorClosed("closing"),
    WorkerLost("worker died"),
    ValueError("not a QChatError"),
    KeyboardInterrupt(),
]


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_errors_that_are_not_the_services_fault_neither_count_nor_reset(
    tmp_path: Path, storage: str
):
    breaker = Breaker("q", breaker_settings(storage=storage), tmp_path)
    fail(breaker, 2)
    for error in NOT_COUNTING:
        breaker.record(breaker.admit(), error)
    assert breaker.fail_count == 2
    assert breaker.state == "closed"

    # A success resets the count...
    breaker.record(breaker.admit(), None)
    assert breaker.fail_count == 0

    # ...and every error that trips the breaker counts.
    tripping = [
        QChatTimeout("t"),
        QChatProcessError("p"),
        QChatAuthError("a"),
    ]
    for error in tripping:
        breaker.record(breaker.admit(), error)
    assert breaker.state == "open"


def test_a_trial_that_ends_in_a_non_counting_error_frees_the_trial(tmp_path: Path):
    clock = FakeClock()
    breaker = Breaker("q", breaker_settings(reset_timeout=5.0), tmp_path, clock=clock)
    fail(breaker, 3)
    clock.advance(5.0)

    trial = breaker.admit()
    breaker.record(trial, PromptRejected("the prompt's fault"))
    assert breaker.state == "half-open"

    # The next caller gets the trial at once, without another reset_timeout.
    again = breaker.admit()
    assert again.trial
    breaker.record(again, None)
    assert breaker.state == "closed"


def test_release_frees_a_trial_and_check_takes_nothing(tmp_path: Path):
    clock = FakeClock()
    breaker = Breaker("q", breaker_settings(reset_timeout=5.0), tmp_path, clock=clock)
    breaker.check()
    fail(breaker, 3)
    with pytest.raises(CircuitOpen):
        breaker.check()

    clock.advance(5.0)
    breaker.check()
    trial = breaker.admit()
    with pytest.raises(CircuitOpen):
        breaker.check()
    breaker.release(trial)
    breaker.check()
    assert breaker.admit().trial


def test_late_outcomes_of_calls_admitted_before_it_opened_do_not_count(tmp_path: Path):
    clock = FakeClock()
    breaker = Breaker("q", breaker_settings(reset_timeout=5.0), tmp_path, clock=clock)
    slow_calls = [breaker.admit() for _ in range(3)]
    fail(breaker, 3)
    assert breaker.state == "open"

    breaker.record(slow_calls[0], None)
    assert breaker.state == "open"
    breaker.record(slow_calls[1], QChatServiceError("late"))
    assert breaker.fail_count == 3

    clock.advance(5.0)
    trial = breaker.admit()
    breaker.record(slow_calls[2], None)
    assert breaker.state == "half-open"
    breaker.record(trial, None)
    assert breaker.state == "closed"


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_a_trial_lease_expires(tmp_path: Path, storage: str):
    clock = FakeClock()
    breaker = Breaker(
        "q", breaker_settings(storage=storage, reset_timeout=0.2), tmp_path, clock=clock
    )
    fail(breaker, 3)
    clock.advance(0.2)

    lost = breaker.admit(lease_seconds=0.3)
    assert lost.trial
    with pytest.raises(CircuitOpen):
        breaker.admit()

    # diskcache expires the lease on the wall clock; memory on the breaker's.
    time.sleep(0.35)
    clock.advance(0.35)
    taken_over = breaker.admit()
    assert taken_over.trial

    # The lost trial's late answer decides nothing now that another holds it.
    breaker.record(lost, QChatServiceError("late"))
    assert breaker.state == "half-open"
    breaker.record(taken_over, None)
    assert breaker.state == "closed"


def test_force_close_and_disabled(tmp_path: Path, logs: ListHandler):
    breaker = Breaker("q", breaker_settings(), tmp_path)
    fail(breaker, 3)
    breaker.force_close()
    assert breaker.state == "closed"
    assert breaker.fail_count == 0
    assert not breaker.admit().trial
    assert any("closed by an operator (was open)" in m for m in logs.messages())

    disabled = Breaker("q2", breaker_settings(enabled=False), tmp_path)
    fail(disabled, 10)
    assert disabled.state == "closed"
    assert disabled.snapshot()["enabled"] is False
    assert not (tmp_path / "breaker" / "q2").exists()


def test_on_transition_hook_and_a_hook_that_raises(tmp_path: Path, logs: ListHandler):
    seen: list[tuple[str, str, str]] = []
    clock = FakeClock()
    breaker = Breaker(
        "q",
        breaker_settings(reset_timeout=1.0),
        tmp_path,
        clock=clock,
        on_transition=lambda *args: seen.append(args),
    )
    fail(breaker, 3)
    clock.advance(1.0)
    breaker.record(breaker.admit(), None)
    assert seen == [
        ("q", "closed", "open"),
        ("q", "open", "half-open"),
        ("q", "half-open", "closed"),
    ]

    def broken_hook(*args: str) -> None:
        raise RuntimeError("metrics are down")

    other = Breaker("other", breaker_settings(), tmp_path, on_transition=broken_hook)
    fail(other, 3)
    assert other.state == "open"
    assert any("on_transition hook failed" in m for m in logs.messages(logging.ERROR))


def test_memory_storage_and_no_state_dir_share_nothing(tmp_path: Path):
    first = Breaker("q", breaker_settings(storage="memory"), tmp_path)
    second = Breaker("q", breaker_settings(storage="memory"), tmp_path)
    fail(first, 3)
    assert first.state == "open"
    assert second.state == "closed"
    assert Breaker("q", breaker_settings(), None).snapshot()["storage"] == "memory"


def test_bad_names_and_storages_are_refused(tmp_path: Path):
    with pytest.raises(ValueError):
        Breaker("../q", breaker_settings(), tmp_path)
    with pytest.raises(ValueError):
        Breaker("q", breaker_settings(storage="redis"), tmp_path)


def test_a_corrupt_state_dir_degrades_to_memory_with_one_warning(
    tmp_path: Path, logs: ListHandler
):
    directory = tmp_path / "breaker" / "q"
    directory.mkdir(parents=True)
    (directory / "cache.db").write_bytes(b"this is not a database\n" * 100)

    breaker = Breaker("q", breaker_settings(), tmp_path)
    ticket = breaker.admit()
    fail(breaker, 3)
    breaker.record(ticket, None)
    assert breaker.state == "open"
    snapshot = breaker.snapshot()
    assert snapshot["storage"] == "memory"
    assert "not a database" in snapshot["degraded"]

    warnings = logs.messages(logging.WARNING)
    degraded = [m for m in warnings if "falls back to memory storage" in m]
    assert len(degraded) == 1
    assert str(directory) in degraded[0]


def test_an_unusable_state_dir_degrades_to_memory(tmp_path: Path, logs: ListHandler):
    # Tests run as root, where chmod does not stop writes: a path below a
    # regular file cannot be a directory for anyone.
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    breaker = Breaker("q", breaker_settings(), not_a_dir / "state")
    assert not breaker.admit().trial
    fail(breaker, 3)
    assert breaker.state == "open"
    assert len([m for m in logs.messages() if "falls back" in m]) == 1


def test_state_dir_modes(tmp_path: Path):
    breaker = Breaker("q", breaker_settings(), tmp_path / "state")
    fail(breaker, 1)
    directory = tmp_path / "state" / "breaker" / "q"
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert (directory.parent.stat().st_mode & 0o777) == 0o700
    for path in directory.iterdir():
        assert (path.stat().st_mode & 0o777) == 0o600, path


def test_admit_cost_with_disk_storage(tmp_path: Path):
    breaker = Breaker("q", breaker_settings(), tmp_path)
    ticket = breaker.admit()
    samples = []
    for _ in range(2000):
        started = time.perf_counter()
        ticket = breaker.admit()
        samples.append(time.perf_counter() - started)
    breaker.record(ticket, None)
    p50 = statistics.median(samples) * 1e6
    p99 = sorted(samples)[int(len(samples) * 0.99)] * 1e6

    record_samples = []
    for _ in range(500):
        ticket = breaker.admit()
        started = time.perf_counter()
        breaker.record(ticket, QChatServiceError("x") if len(record_samples) % 2 else None)
        record_samples.append(time.perf_counter() - started)
    record_p50 = statistics.median(record_samples) * 1e6

    print(
        f"\nbreaker admit() closed, disk storage: p50 {p50:.1f} us, p99 {p99:.1f} us; "
        f"record() alternating failure/success: p50 {record_p50:.1f} us"
    )
    assert p50 < 2000


# ---------------------------------------------------------------------------
# Several processes sharing one disk breaker

CHILD = textwrap.dedent(
    """
    import json, logging, os, pathlib, sys, time, types

    from ralph_supervisor.breaker import Breaker
    from ralph_supervisor.errors import CircuitOpen, QChatServiceError

    args = json.loads(sys.argv[1])

    class Count(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []
        def emit(self, record):
            self.messages.append(record.getMessage())

    counter = Count()
    logger = logging.getLogger("ralph_supervisor.breaker")
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)

    transitions = []
    breaker = Breaker(
        "q",
        types.SimpleNamespace(**args["settings"]),
        pathlib.Path(args["state_dir"]),
        on_transition=lambda *t: transitions.append(t[1:]),
    )
    breaker.state  # open the store before the start line

    pathlib.Path(args["ready"]).write_text(str(os.getpid()))
    go = pathlib.Path(args["go"])
    give_up = time.monotonic() + 20
    while not go.exists():
        if time.monotonic() > give_up:
            sys.exit("the go file never came")
        time.sleep(0.002)

    result = {"pid": os.getpid(), "trial": False, "refused": 0, "recorded": 0}
    action = args["action"]
    if action == "fail":
        for _ in range(args["times"]):
            try:
                ticket = breaker.admit()
            except CircuitOpen:
                result["refused"] += 1
                continue
            breaker.record(ticket, QChatServiceError("service unavailable"))
            result["recorded"] += 1
    elif action in ("admit", "admit_and_hang"):
        try:
            ticket = breaker.admit(lease_seconds=args.get("lease_seconds"))
            result["trial"] = ticket.trial
        except CircuitOpen as error:
            result["refused"] += 1
            result["retry_at"] = error.retry_at
        if action == "admit_and_hang" and result["trial"]:
            pathlib.Path(args["holding"]).write_text("")
            time.sleep(60)

    result["transitions"] = transitions
    result["logged"] = counter.messages
    print(json.dumps(result))
    """
)


class Children:
    """Child interpreters started together on a marker file."""

    def __init__(self, tmp_path: Path, state_dir: Path) -> None:
        self.tmp_path = tmp_path
        self.state_dir = state_dir
        self.go = tmp_path / "go"
        self.processes: list[tuple[subprocess.Popen[str], Path]] = []

    def start(self, action: str, settings: dict[str, Any], **extra: Any) -> subprocess.Popen[str]:
        index = len(self.processes)
        ready = self.tmp_path / f"ready-{index}"
        args = {
            "action": action,
            "settings": settings,
            "state_dir": str(self.state_dir),
            "ready": str(ready),
            "go": str(self.go),
            **extra,
        }
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append((process, ready))
        return process

    def release(self) -> None:
        give_up = time.monotonic() + CHILD_TIMEOUT
        for process, ready in self.processes:
            while not ready.exists():
                if process.poll() is not None:
                    raise AssertionError(f"child died early: {process.communicate()}")
                if time.monotonic() > give_up:
                    raise AssertionError("children never became ready")
                time.sleep(0.005)
        self.go.write_text("")

    def results(self) -> list[dict[str, Any]]:
        results = []
        for process, _ in self.processes:
            out, err = process.communicate(timeout=CHILD_TIMEOUT)
            assert process.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results

    def kill_all(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    group = Children(tmp_path, tmp_path / "state")
    try:
        yield group
    finally:
        group.kill_all()


def shared_settings(**changes: Any) -> dict[str, Any]:
    return vars(breaker_settings(**changes))


def test_failures_in_one_process_open_it_for_all(tmp_path: Path, children: Children):
    settings = shared_settings(fail_max=3, reset_timeout=30.0)
    children.start("fail", settings, times=3)
    children.release()
    (result,) = children.results()
    assert result["recorded"] == 3

    here = Breaker("q", breaker_settings(**settings), children.state_dir)
    assert here.state == "open"
    with pytest.raises(CircuitOpen) as refused:
        here.admit()
    assert refused.value.retry_at > time.time() + 25


def test_concurrent_failures_open_it_once_and_it_is_logged_once(
    tmp_path: Path, children: Children
):
    settings = shared_settings(fail_max=3, reset_timeout=30.0)
    for _ in range(5):
        children.start("fail", settings, times=4)
    children.release()
    results = children.results()

    logged = [m for r in results for m in r["logged"] if "opened after" in m]
    transitions = [t for r in results for t in r["transitions"]]
    assert len(logged) == 1, logged
    assert transitions == [["closed", "open"]]

    here = Breaker("q", breaker_settings(**settings), children.state_dir)
    snapshot = here.snapshot()
    assert snapshot["state"] == "open"
    assert snapshot["transitions"] == 1
    # Failures recorded after it opened were refused or ignored, not counted.
    assert snapshot["fail_count"] == 3


DUE_SETTINGS = {"fail_max": 2, "reset_timeout": 0.3}


@pytest.fixture
def due_breaker(children: Children) -> Breaker:
    """A shared breaker opened long enough ago that a trial is due."""
    breaker = Breaker("q", breaker_settings(**DUE_SETTINGS), children.state_dir)
    fail(breaker, 2)
    time.sleep(0.35)
    assert breaker.state == "open"
    return breaker


def test_many_processes_race_for_the_trial_and_one_wins(due_breaker: Breaker, children: Children):
    for _ in range(6):
        children.start("admit", shared_settings(**DUE_SETTINGS), lease_seconds=30.0)
    children.release()
    results = children.results()

    assert sum(r["trial"] for r in results) == 1, results
    refused = [r for r in results if not r["trial"]]
    assert len(refused) == 5
    assert all(r["retry_at"] is None for r in refused)
    assert [t for r in results for t in r["transitions"]] == [["open", "half-open"]]

    snapshot = due_breaker.snapshot()
    assert snapshot["state"] == "half-open"
    assert snapshot["trial_in_progress"]


def test_the_lease_of_a_killed_trial_holder_expires(due_breaker: Breaker, children: Children):
    holding = children.tmp_path / "holding"
    process = children.start(
        "admit_and_hang",
        shared_settings(**DUE_SETTINGS),
        lease_seconds=0.5,
        holding=str(holding),
    )
    children.release()
    give_up = time.monotonic() + CHILD_TIMEOUT
    while not holding.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < give_up, "the child never took the trial"
        time.sleep(0.005)

    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    killed_at = time.monotonic()

    with pytest.raises(CircuitOpen) as busy:
        due_breaker.admit()
    assert busy.value.retry_at is None

    time.sleep(max(0.0, 0.55 - (time.monotonic() - killed_at)))
    ticket = due_breaker.admit()
    assert ticket.trial
    due_breaker.record(ticket, None)
    assert due_breaker.state == "closed"


def test_a_forked_child_opens_its_own_store(tmp_path: Path):
    breaker = Breaker("q", breaker_settings(), tmp_path)
    fail(breaker, 1)

    pid = os.fork()
    if pid == 0:  # the child: record two failures through its own connection
        code = 1
        try:
            fail(breaker, 2)
            code = 0 if breaker.state == "open" else 2
        finally:
            os._exit(code)

    assert reap_forked_child(pid, CHILD_TIMEOUT) == 0
    assert breaker.state == "open"


def test_ticket_is_a_plain_value():
    ticket = Ticket("q", trial=True, owner="1-abc")
    assert ticket == Ticket("q", True, "1-abc")
