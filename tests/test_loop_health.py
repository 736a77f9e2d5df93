"""A loop that makes no progress is stopped, and its history tells the story.

Real `start` processes with the simulator as the agent: a stalled agent
(edits nothing), a repeating one (the same answer every time), a working
one (ticks its checklist, writes files), and a SIGKILL in the middle.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config, wait_until
from test_start import Runner, checklist, read_checkpoint

from ralph_supervisor.history import read_history
from ralph_supervisor.loop import EXIT_FAILED, EXIT_STALLED, LoopSettings, RalphLoop, Task
from ralph_supervisor.supervisor import Supervisor


def git_init(workdir: Path) -> None:
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=workdir, check=True, timeout=30)


def history(workdir: Path) -> list[dict[str, Any]]:
    return read_history(workdir / ".ralph" / "history.jsonl").records


def log_messages(stderr: str) -> list[str]:
    return [json.loads(line)["message"] for line in stderr.splitlines() if line.startswith("{")]


def test_an_agent_that_edits_nothing_is_stopped_as_stalled(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(6))
    git_init(workdir)
    # Repeats off: the stalled agent says the same thing each time, and
    # this test is about the work tree.
    config = runner.config("loop:\n  max_idle_iterations: 3\n  max_repeats: 0\n")

    done = runner.run_start(workdir, "--config", str(config), env={"QCHAT_SIM_STALL": "1"})

    assert done.returncode == EXIT_STALLED, done.stderr
    checkpoint = read_checkpoint(workdir)
    assert (checkpoint["status"], checkpoint["stop_reason"]) == ("stopped", "stalled")
    assert checkpoint["iteration"] == 3 and checkpoint["idle_iterations"] == 3
    assert "no change to the work tree in 3 iterations" in checkpoint["stop_message"]
    records = history(workdir)
    assert [r["number"] for r in records] == [1, 2, 3]
    assert [r["idle_iterations"] for r in records] == [1, 2, 3]
    assert all(r["files_changed"] == 0 and r["outcome"] == "success" for r in records)
    assert all(r["agent"] == "sim" and r["attempts"] == 1 for r in records)
    assert len({r["output_sha256"] for r in records}) == 1
    assert "- [ ] step 1" in (workdir / "PROMPT.md").read_text()

    report = runner.run("report", "--workdir", str(workdir), "--config", str(config), "--json")
    assert report.returncode == 0, report.stderr
    task = json.loads(report.stdout)["tasks"][0]
    assert (task["status"], task["stop_reason"], task["iterations"]) == ("stopped", "stalled", 3)


def test_an_agent_that_repeats_itself_is_stopped_as_repeating(runner: Runner) -> None:
    # No git here: the no-change rule is off, and the log says so once.
    workdir = runner.workdir(prompt=checklist(8))
    config = runner.config()

    done = runner.run_start(
        workdir, "--config", str(config), env={"QCHAT_SIM_REPEAT": "Still working on it."}
    )

    assert done.returncode == EXIT_STALLED, done.stderr
    checkpoint = read_checkpoint(workdir)
    assert (checkpoint["stop_reason"], checkpoint["iteration"]) == ("repeating", 3)
    assert "the same answer 3 times in a row" in checkpoint["stop_message"]
    records = history(workdir)
    assert [r["repeat_count"] for r in records] == [1, 2, 3]
    assert [r["similarity"] for r in records] == [None, 1.0, 1.0]
    assert all(r["files_changed"] is None for r in records)  # not measured
    off = [m for m in log_messages(done.stderr) if "not in a git work tree" in m]
    assert len(off) == 1 and "loop.max_idle_iterations" in off[0]
    # The repeating agent still ticked its items: the rule reads answers.
    assert (workdir / "PROMPT.md").read_text().count("- [x]") == 3


def test_an_agent_that_works_runs_to_completion(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(6))
    git_init(workdir)
    config = runner.config("loop:\n  max_idle_iterations: 1\n  max_repeats: 2\n")

    done = runner.run_start(workdir, "--config", str(config), env={"QCHAT_SIM_WORK_DIR": "work"})

    assert done.returncode == 0, done.stderr
    checkpoint = read_checkpoint(workdir)
    assert (checkpoint["status"], checkpoint["iteration"]) == ("complete", 6)
    records = history(workdir)
    assert [r["number"] for r in records] == list(range(1, 7))
    # Each item: PROMPT.md ticked (+1 -1) and work/item-N.txt written (+1).
    for number, record in enumerate(records, start=1):
        assert sorted(record["paths"]) == ["PROMPT.md", f"work/item-{number}.txt"]
        assert (record["files_changed"], record["lines_added"], record["lines_removed"]) == (
            2,
            2,
            1,
        )
        assert (record["idle_iterations"], record["repeat_count"]) == (0, 1)
    assert [r["promise"] for r in records] == [False] * 5 + [True]
    assert records[-1]["outcome"] == "complete"


def test_the_history_survives_sigkill_and_the_report_reads_a_running_loop(
    runner: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    workdir = runner.workdir(prompt=checklist(12))
    git_init(workdir)
    config = str(runner.config())
    process = runner.start(
        workdir,
        "--config",
        config,
        "--checkpoint-interval",
        "2",
        env={"QCHAT_SIM_LATENCY": "0.3", "QCHAT_SIM_WORK_DIR": "work"},
    )
    path = workdir / ".ralph" / "history.jsonl"
    assert wait_until(lambda: len(history(workdir)) >= 3, timeout=30)

    # The live counters, as the console and the status line read them.
    url = json.loads((workdir / ".ralph" / "health.json").read_text())["url"]
    with urllib.request.urlopen(f"{url}/health/detailed", timeout=5) as answer:
        loop = json.loads(answer.read())["loop"][workdir.name]
    assert loop["idle_iterations"] == 0 and loop["repeat_count"] == 1
    assert (loop["max_idle_iterations"], loop["max_repeats"]) == (5, 3)
    assert loop["stop_reason"] is None

    live = runner.run("report", "--workdir", str(workdir), "--config", config)
    assert live.returncode == 0, live.stderr
    assert f"running (pid {process.pid}), at iteration" in live.stdout

    process.send_signal(signal.SIGKILL)
    process.wait(10)
    assert wait_until(lambda: not runner.tagged(), timeout=5)
    before = len(history(workdir))
    with open(path, "ab") as stream:
        stream.write(b'{"task":"work","number":99,"outc')  # a write cut by the crash

    with caplog.at_level(logging.WARNING, logger="ralph_supervisor.history"):
        torn = read_history(path)
    assert len(torn.records) == before and len(torn.skipped) == 1
    assert "torn" in caplog.text

    killed = runner.run("report", "--workdir", str(workdir), "--config", config, "--json")
    assert json.loads(killed.stdout)["tasks"][0]["status"] == "interrupted"

    done = runner.run_start(workdir, "--config", config, "--checkpoint-interval", "2")
    assert done.returncode == 0, done.stderr
    after = read_history(path)
    assert after.skipped == torn.skipped  # the torn line stays skipped
    assert after.records[:before] == torn.records
    resumed = after.records[before:]
    assert resumed and all(r["run"] == 2 for r in resumed)
    assert resumed[-1]["number"] == read_checkpoint(workdir)["iteration"]
    assert resumed[-1]["outcome"] == "complete"


# -- in process: the failure rule and rules turned off ------------------------------


@pytest.fixture
def supervisor(tmp_path: Path) -> Any:
    config = make_config(tmp_path, breaker__enabled=False, adapter__max_retries=0)
    supervisor = Supervisor(config, state_dir=tmp_path / "state")
    supervisor.start()
    yield supervisor
    supervisor.close(drain_timeout=0)


def make_loop(supervisor: Supervisor, tmp_path: Path, prompt: str, **settings: Any) -> RalphLoop:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "PROMPT.md").write_text(prompt)
    task = Task("demo", workdir, workdir / "PROMPT.md", workdir / ".ralph")
    loop = RalphLoop(
        supervisor, task, LoopSettings(git_commit=False, metrics_interval=None, **settings)
    )
    assert loop.prepare() is None
    return loop


def test_failures_in_a_row_stop_with_the_error_named(supervisor: Any, tmp_path: Path) -> None:
    loop = make_loop(
        supervisor, tmp_path, "@sim:exit=3\n" + checklist(4), max_consecutive_failures=3
    )
    result = loop.run()

    assert (result.exit_code, result.reason) == (EXIT_FAILED, "consecutive_failures")
    assert "3 iterations failed in a row with process_error" in result.message
    records = history(tmp_path / "work")
    assert [r["error_type"] for r in records] == ["QChatProcessError"] * 3
    assert all(r["outcome"] == "process_error" for r in records)
    saved = read_checkpoint(tmp_path / "work")
    assert saved["stop_message"] == result.message


def test_rules_turned_off_let_a_spinning_agent_run_to_its_limit(
    supervisor: Any, tmp_path: Path
) -> None:
    loop = make_loop(
        supervisor,
        tmp_path,
        "@sim:stall=1\n" + checklist(2),
        max_iterations=4,
        max_idle_iterations=None,
        max_repeats=None,
    )
    result = loop.run()

    assert (result.reason, result.iteration) == ("max_iterations", 4)
    progress = loop.progress()
    assert progress["repeat_count"] == 4
    assert progress["max_repeats"] is None and progress["max_idle_iterations"] is None
    assert progress["stop_reason"] == "max_iterations"
