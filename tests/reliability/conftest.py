"""Helpers of the reliability suite: sizes, figures, and process accounting.

Every test here runs at two sizes. The bounded size runs with the default
test command and fits CI; the full size carries the `full` marker and runs
alone with `pytest -m full tests/reliability`.

Each test reports its figures as one line (`chaos: requests=400 ok=...`):
printed, recorded with record_property (so --junitxml keeps them), and
repeated in a "reliability figures" section at the end of the run, so they
show whether or not output is captured.

    ProcessLedger: every process a run ever had, by identity (pid plus start
    time), so that a pid the kernel hands to somebody else later is not
    mistaken for a survivor of the run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

TESTS_DIR = Path(__file__).resolve().parent.parent
SESSION_TAG = os.environ["RALPH_TEST_SESSION"]  # set by tests/conftest.py

_FIGURES: list[str] = []


def sizes(bounded: Any, full: Any, *, bounded_timeout: int, full_timeout: int) -> list[Any]:
    """The two sizes of a test, as parameters: `bounded` and `full`."""
    return [
        pytest.param(bounded, id="bounded", marks=pytest.mark.timeout(bounded_timeout)),
        pytest.param(
            full,
            id="full",
            marks=[pytest.mark.full, pytest.mark.timeout(full_timeout)],
        ),
    ]


@pytest.fixture
def report(request: pytest.FixtureRequest, record_property: Callable[[str, Any], None]):
    """report(name, **figures): one summary line, printed and recorded."""

    def write(name: str, **figures: Any) -> str:
        size = request.node.callspec.id if hasattr(request.node, "callspec") else ""
        parts = " ".join(f"{key}={_show(value)}" for key, value in figures.items())
        line = f"{name}[{size}]: {parts}" if size else f"{name}: {parts}"
        print(line)
        for key, value in figures.items():
            record_property(f"{name}.{key}", value)
        _FIGURES.append(line)
        return line

    return write


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for line in _FIGURES:
        terminalreporter.write_line(line)


# -- processes ---------------------------------------------------------------


def is_ours(process: psutil.Process) -> bool:
    """Whether a live process belongs to this test session (by its tag)."""
    try:
        return process.environ().get("RALPH_TEST_SESSION") == SESSION_TAG
    except psutil.Error:
        return False


def is_alive(process: psutil.Process) -> bool:
    """Still running and not a zombie; False for a pid now used by another."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def multiprocessing_helpers() -> set[int]:
    """The fork server and resource tracker: they live for the whole session."""
    pids = set()
    with contextlib.suppress(Exception):
        from multiprocessing import forkserver, resource_tracker

        pids.add(forkserver._forkserver._forkserver_pid)  # type: ignore[attr-defined]
        pids.add(resource_tracker._resource_tracker._pid)  # type: ignore[attr-defined]
    pids.discard(None)  # type: ignore[arg-type]
    return pids


class ProcessLedger:
    """Every process a run had, remembered by pid and start time."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self.counted: dict[int, float] = {}  # simulator pid -> time it counted itself
        self._helpers = {os.getpid()}

    def ignore(self, *pids: int) -> None:
        self._helpers.update(pids)

    def note(self, pid: int | None) -> None:
        if not pid or pid in self._helpers:
            return
        try:
            process = psutil.Process(pid)
            key = (pid, process.create_time())
        except psutil.Error:
            return  # already gone, and reaped: nothing to check later
        self.seen.setdefault(key, process)

    def note_session(self) -> None:
        """Record every live process of this test session."""
        for process in psutil.process_iter(["pid"]):
            if process.pid not in self._helpers and is_ours(process):
                self.note(process.pid)

    def note_count_file(self, path: Path) -> int:
        """Record the simulator pids of a count_file; return its line count."""
        if not path.exists():
            return 0
        lines = path.read_text().splitlines()
        for line in lines:
            pid_text, moment, *_ = line.split("\t")
            self.counted[int(pid_text)] = float(moment)
        return len(lines)

    def survivors(self) -> list[psutil.Process]:
        helpers = self._helpers | multiprocessing_helpers()
        alive = [p for p in self.seen.values() if p.pid not in helpers and is_alive(p)]
        known = {p.pid for p in alive}
        for pid, moment in self.counted.items():
            if pid in known or pid in helpers:
                continue
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                # A process started after the simulator counted itself only
                # reuses its pid; it was never part of the run.
                same = process.create_time() <= moment + 1.0
                if same and is_alive(process) and is_ours(process):
                    alive.append(process)
        return alive

    def wait_for_none(self, timeout: float = 10.0) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.survivors()
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def __len__(self) -> int:
        return len({pid for pid, _ in self.seen} | set(self.counted))


def describe(processes: list[psutil.Process]) -> str:
    lines = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{process.pid} {process.status()} {' '.join(process.cmdline())[:150]}")
    return "\n".join(lines)


def zombie_descendants() -> list[psutil.Process]:
    """Descendants of this process that died and wait to be reaped."""
    zombies = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.status() == psutil.STATUS_ZOMBIE:
                zombies.append(process)
    return zombies


# -- owner processes -----------------------------------------------------------


OWNER_PRELUDE = f"""
import json, os, sys, time
sys.path.insert(0, {str(TESTS_DIR)!r})
from pathlib import Path
from conftest import make_config
"""


class Owner:
    """A script running in its own session, its output read by threads."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(process.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, is_stdout: bool) -> None:
        for line in stream:
            if is_stdout:
                self.stdout.append(line)
                self.lines.put(line)
            else:
                self.stderr.append(line)
        if is_stdout:
            self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def line(self, timeout: float) -> str:
        """The next line of stdout; fail the test if none comes in time."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line from pid {self.pid} within {timeout} s:\n{self.stderr_text}")
        if line is None:
            pytest.fail(f"pid {self.pid} closed its stdout:\n{self.stderr_text}")
        return line

    def wait(self, timeout: float) -> int:
        """The exit status; fail the test (after killing the group) on a timeout."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.process)
            pytest.fail(f"pid {self.pid} still running after {timeout} s:\n{self.stderr_text}")
        for reader in self._readers:
            reader.join(10)
        return code

    @property
    def stderr_text(self) -> str:
        return "".join(self.stderr)


@contextlib.contextmanager
def owner_process(script: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Owner]:
    """Run a script in a new session; kill its whole group on the way out.

    A script builds its Supervisor under `if __name__ == "__main__":`: the
    fork server imports __main__ again in every worker.
    """
    process = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
        cwd=script.parent,
    )
    try:
        yield Owner(process)
    finally:
        kill_group(process)


def kill_group(process: subprocess.Popen[Any]) -> None:
    """SIGKILL the process's whole group (it leads one) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
