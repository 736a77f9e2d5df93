"""Shared test fixtures: the simulator as the agent, and the leak check.

Every process the test session starts carries RALPH_TEST_SESSION in its
environment (set here, before anything is spawned, so workers forked from
the fork server inherit it too). After each test, no process with the tag
may remain but pytest itself and multiprocessing's own helpers: a leaked
agent, worker or grandchild fails the test that left it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

# A helper script that imports this module from a test keeps the tag of the
# session that started it, so its processes are checked too.
SESSION_TAG = os.environ.get("RALPH_TEST_SESSION") or uuid.uuid4().hex
os.environ["RALPH_TEST_SESSION"] = SESSION_TAG

# A hung test prints every thread's stack before pytest-timeout fails it.
faulthandler.enable()

SIM = [sys.executable, "-m", "ralph_supervisor.simulator"]


def _helper_pids() -> set[int]:
    """multiprocessing's fork server and resource tracker live for the session."""
    pids = {os.getpid()}
    with contextlib.suppress(Exception):
        from multiprocessing import forkserver, resource_tracker

        fs_pid = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
        if fs_pid:
            pids.add(fs_pid)
        rt_pid = resource_tracker._resource_tracker._pid  # type: ignore[attr-defined]
        if rt_pid:
            pids.add(rt_pid)
    return pids


def tagged_processes() -> list[psutil.Process]:
    """Live processes of this test session, other than pytest and its helpers."""
    helpers = _helper_pids()
    found = []
    for process in psutil.process_iter(["pid"]):
        if process.pid in helpers:
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get("RALPH_TEST_SESSION") == SESSION_TAG:
                found.append(process)
        except psutil.Error:
            continue
    return found


def wait_for_no_leaks(timeout: float = 5.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        leaked = tagged_processes()
        if not leaked or time.monotonic() >= deadline:
            return leaked
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    yield
    leaked = wait_for_no_leaks()
    if leaked:
        described = []
        for process in leaked:
            with contextlib.suppress(psutil.Error):
                described.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        pytest.fail("processes left running after the test:\n" + "\n".join(described))


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """For tests that install the supervisor's handlers in pytest's process."""
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Any]:
    """Runs ralph-supervisor commands as processes and always cleans up."""
    from test_start import Runner

    runner = Runner(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def sim_command() -> list[str]:
    return [*SIM, "chat", "--no-interactive", "--trust-all-tools"]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


def make_config(tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    """A configuration for the simulator with test-friendly limits."""
    from ralph_supervisor.config import load_config

    values: dict[str, object] = {
        "adapter.name": "sim",
        "adapter.timeout": 20,
        "adapter.retry_delay": 0.05,
        "adapter.max_retry_delay": 0.2,
        "adapter.kill_grace": 0.5,
        "performance.max_concurrent": 2,
        "state.dir": str(tmp_path / "state"),
        "breaker.storage": "memory",
        "supervisor.drain_timeout": 10,
        "supervisor.hang_grace": 2,
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_config(env={}, overrides=values)


def reap_forked_child(pid: int, timeout: float = 30.0) -> int:
    """The exit code of a child forked by the test; SIGKILL and fail if it hangs."""
    give_up = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > give_up:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)


@contextlib.contextmanager
def captured_logs(name: str) -> Iterator[list[logging.LogRecord]]:
    """Every record of logger `name` (and below), at any level, while open."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(name)
    handler = Keep(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
