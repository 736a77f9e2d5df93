"""The Ralph loop, in-process, over a real Supervisor with the simulator as agent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config, wait_until

from ralph_supervisor.checkpoint import Checkpoint, CheckpointStore
from ralph_supervisor.loop import (
    EXIT_FAILED,
    EXIT_LIMIT,
    EXIT_OK,
    EXIT_STALLED,
    EXIT_USAGE,
    STDERR_SEPARATOR,
    LoopSettings,
    RalphLoop,
    Task,
    has_task_complete_marker,
    worst_exit_code,
)
from ralph_supervisor.metrics import Metrics
from ralph_supervisor.supervisor import Supervisor

QUICK = LoopSettings(checkpoint_interval=2, git_commit=False, metrics_interval=None)


def checklist(items: int, extra: str = "") -> str:
    lines = [f"- [ ] item {n}" for n in range(1, items + 1)]
    return "Work through the list.\n" + extra + "\n".join(lines) + "\n"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def make_supervisor(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def build(**overrides: Any) -> Supervisor:
        config = make_config(tmp_path, **overrides)
        supervisor = Supervisor(config, state_dir=tmp_path / "state")
        supervisor.start()
        started.append(supervisor)
        return supervisor

    yield build
    for supervisor in started:
        supervisor.close(drain_timeout=0)


def make_loop(
    supervisor: Supervisor,
    workdir: Path,
    prompt: str,
    settings: LoopSettings = QUICK,
    **kwargs: Any,
) -> RalphLoop:
    prompt_file = workdir / "PROMPT.md"
    prompt_file.write_text(prompt)
    task = Task("demo", workdir, prompt_file, workdir / ".ralph")
    return RalphLoop(supervisor, task, settings, **kwargs)


# -- pure helpers ---------------------------------------------------------------


def test_worst_exit_code_order() -> None:
    assert worst_exit_code([]) == EXIT_OK
    assert worst_exit_code([EXIT_OK, EXIT_LIMIT]) == EXIT_LIMIT
    assert worst_exit_code([EXIT_LIMIT, EXIT_STALLED]) == EXIT_STALLED
    assert worst_exit_code([EXIT_STALLED, EXIT_FAILED, EXIT_OK]) == EXIT_FAILED
    assert worst_exit_code([EXIT_FAILED, EXIT_USAGE, EXIT_LIMIT]) == EXIT_USAGE
    assert worst_exit_code([EXIT_OK, 99]) == EXIT_FAILED


@pytest.mark.parametrize(
    ("text", "done"),
    [
        ("- [x] TASK_COMPLETE\n", True),
        ("intro\n  * [X] TASK_COMPLETE  \nmore", True),
        ("- [ ] TASK_COMPLETE\n", False),
        ("say - [x] TASK_COMPLETE inline\n", False),
        ("- [x] TASK_COMPLETE soon\n", False),
    ],
)
def test_task_complete_marker(text: str, done: bool) -> None:
    assert has_task_complete_marker(text) is done


# -- runs -----------------------------------------------------------------------


def test_loop_completes_and_keeps_each_iterations_output(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    supervisor = make_supervisor()
    metrics = Metrics()
    settings = LoopSettings(checkpoint_interval=2, git_commit=False, metrics_interval=1)
    loop = make_loop(supervisor, workdir, checklist(3), settings, metrics=metrics)

    assert loop.prepare() is None
    result = loop.run()

    assert (result.status, result.exit_code, result.reason) == (
        "complete",
        0,
        "completion_promise",
    )
    assert result.iteration == 3
    logs = sorted(p.name for p in (workdir / ".ralph" / "iterations").iterdir())
    assert logs == ["0001.log", "0002.log", "0003.log"]
    last = (workdir / ".ralph" / "iterations" / "0003.log").read_text()
    assert "LOOP_COMPLETE" in last.split(STDERR_SEPARATOR)[0]

    saved = CheckpointStore(workdir / ".ralph").load()
    assert saved is not None
    assert (saved.status, saved.iteration, saved.successes, saved.attempts) == (
        "complete",
        3,
        3,
        3,
    )
    exposition = metrics.render()[0].decode()
    assert 'ralph_loop_iterations_total{outcome="success",task="demo"} 2.0' in exposition
    assert 'ralph_loop_iterations_total{outcome="complete",task="demo"} 1.0' in exposition
    assert loop.progress()["status"] == "complete"


def test_the_marker_in_the_prompt_ends_the_task_before_any_call(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    supervisor = make_supervisor()
    loop = make_loop(supervisor, workdir, checklist(2) + "- [x] TASK_COMPLETE\n")
    loop.prepare()
    result = loop.run()

    assert (result.status, result.reason, result.iteration) == (
        "complete",
        "task_complete_marker",
        0,
    )
    assert supervisor.stats()["completed"] == 0


def test_an_empty_prompt_fails_the_task(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    loop = make_loop(make_supervisor(), workdir, "   \n")
    loop.prepare()
    result = loop.run()
    assert (result.status, result.exit_code, result.reason) == (
        "failed",
        EXIT_FAILED,
        "prompt_rejected",
    )


def test_a_stop_request_ends_the_loop_after_the_call_in_flight(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    stop = threading.Event()
    loop = make_loop(
        make_supervisor(), workdir, checklist(5, "@sim:latency=0.6\n"), stop_event=stop
    )
    loop.prepare()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    try:
        result = loop.run()
    finally:
        timer.cancel()

    assert (result.status, result.exit_code, result.reason) == ("stopped", EXIT_OK, "signal")
    assert result.iteration == 1
    saved = CheckpointStore(workdir / ".ralph").load()
    assert saved is not None and (saved.status, saved.iteration) == ("stopped", 1)


def test_the_runtime_limit_cuts_a_slow_call(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    settings = LoopSettings(max_runtime=0.8, git_commit=False, metrics_interval=None)
    loop = make_loop(make_supervisor(), workdir, checklist(2, "@sim:latency=20\n"), settings)
    loop.prepare()
    started = time.monotonic()
    result = loop.run()

    assert (result.status, result.exit_code, result.reason) == (
        "stopped",
        EXIT_LIMIT,
        "max_runtime",
    )
    assert time.monotonic() - started < 5
    log = (workdir / ".ralph" / "iterations" / "0001.log").read_text()
    assert log.startswith("error: timeout:")


def test_consecutive_failures_fail_the_task(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    supervisor = make_supervisor(adapter__max_retries=0, breaker__enabled=False)
    settings = LoopSettings(max_consecutive_failures=3, git_commit=False, metrics_interval=None)
    loop = make_loop(supervisor, workdir, checklist(9, "@sim:exit=3\n"), settings)
    loop.prepare()
    result = loop.run()

    assert (result.status, result.exit_code, result.reason) == (
        "failed",
        EXIT_FAILED,
        "consecutive_failures",
    )
    assert result.iteration == 3
    saved = CheckpointStore(workdir / ".ralph").load()
    assert saved is not None and saved.failures == {"process_error": 3}
    assert "exited with status 3" in (saved.last_error or "")


def test_an_open_breaker_is_waited_for_not_hammered(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    supervisor = make_supervisor(
        adapter__max_retries=0,
        breaker__fail_max=1,
        breaker__reset_timeout=0.7,
    )
    loop = make_loop(supervisor, workdir, checklist(2, "@sim:exit=3\n"))
    loop.prepare()

    def heal_after_first_failure() -> None:
        # Iteration 1 has ended (its log is written after the agent exits):
        # the agent is fixed while the breaker is open.
        log = workdir / ".ralph" / "iterations" / "0001.log"
        if wait_until(log.exists, timeout=15):
            prompt = workdir / "PROMPT.md"
            healed = workdir / "PROMPT.md.new"
            healed.write_text(prompt.read_text().replace("@sim:exit=3\n", ""))
            healed.replace(prompt)

    healer = threading.Thread(target=heal_after_first_failure)
    healer.start()
    started = time.monotonic()
    try:
        result = loop.run()
    finally:
        healer.join(20)

    assert (result.status, result.reason) == ("complete", "completion_promise")
    # One failure opened the circuit; the loop waited for the trial instead
    # of spending iterations against it.
    assert result.iteration == 2
    assert loop.state.failures == {"process_error": 1}
    assert time.monotonic() - started >= 0.5


def test_a_breaker_open_too_long_fails_the_task(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    supervisor = make_supervisor(
        adapter__max_retries=0, breaker__fail_max=1, breaker__reset_timeout=30
    )
    settings = LoopSettings(max_open_wait=0.5, git_commit=False, metrics_interval=None)
    loop = make_loop(supervisor, workdir, checklist(3, "@sim:exit=3\n"), settings)
    loop.prepare()
    result = loop.run()

    assert (result.status, result.exit_code, result.reason) == (
        "failed",
        EXIT_FAILED,
        "breaker_open",
    )
    assert result.iteration == 1


# -- checkpoints: resume, fresh, complete ----------------------------------------


def test_resume_continues_the_numbering(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    state = workdir / ".ralph"
    (state / "iterations").mkdir(parents=True)
    CheckpointStore(state).save(
        Checkpoint(task="demo", iteration=7, successes=7, status="stopped")
    )
    # Iteration 8 ran once, but the process died before its checkpoint.
    (state / "iterations" / "0008.log").write_text("from the lost run\n")

    loop = make_loop(make_supervisor(), workdir, checklist(1))
    assert loop.prepare() is None
    assert loop.resumed_from == 7
    result = loop.run()

    assert (result.status, result.iteration) == ("complete", 8)
    assert "LOOP_COMPLETE" in (state / "iterations" / "0008.log").read_text()
    kept = list((state / "iterations").glob("0008.log.before-resume-*"))
    assert len(kept) == 1 and kept[0].read_text() == "from the lost run\n"
    saved = CheckpointStore(state).load()
    assert saved is not None and (saved.runs, saved.successes) == (2, 8)


def test_max_iterations_counts_resumed_iterations(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    supervisor = make_supervisor()
    CheckpointStore(workdir / ".ralph").save(Checkpoint(task="demo", iteration=5))
    settings = LoopSettings(max_iterations=5, git_commit=False, metrics_interval=None)
    loop = make_loop(supervisor, workdir, checklist(3), settings)
    loop.prepare()
    result = loop.run()

    assert (result.exit_code, result.reason, result.iteration) == (EXIT_LIMIT, "max_iterations", 5)
    assert supervisor.stats()["completed"] == 0


def test_a_complete_task_is_not_run_again_unless_fresh(
    make_supervisor: Callable[..., Supervisor], workdir: Path
) -> None:
    state = workdir / ".ralph"
    CheckpointStore(state).save(
        Checkpoint(task="demo", iteration=4, status="complete", stop_reason="completion_promise")
    )
    (state / "iterations").mkdir()
    (state / "iterations" / "0004.log").write_text("old\n")

    loop = make_loop(make_supervisor(), workdir, checklist(2))
    done = loop.prepare()
    assert done is not None
    assert (done.status, done.exit_code, done.reason) == ("complete", EXIT_OK, "already_complete")
    assert "already complete" in done.message

    fresh = make_loop(loop.supervisor, workdir, checklist(2))
    assert fresh.prepare(fresh=True) is None
    assert fresh.state.iteration == 0
    assert len(list(state.glob("checkpoint.json.fresh-*"))) == 1
    assert len(list(state.glob("iterations.fresh-*"))) == 1
    result = fresh.run()
    assert (result.status, result.iteration) == ("complete", 2)
