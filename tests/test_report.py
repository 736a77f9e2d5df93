"""`ralph-supervisor report`, as a process, on a state directory of known content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_start import Runner

from ralph_supervisor.checkpoint import Checkpoint, CheckpointStore
from ralph_supervisor.history import HistoryWriter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(run: int, number: int, outcome: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "task": "work",
        "run": run,
        "number": number,
        "agent": "sim",
        "started_at": f"2026-01-02T10:00:{number * 10:02d}.000Z",
        "duration_s": 1.0,
        "outcome": outcome,
        "error_type": None,
        "attempts": 1,
        "output_sha256": "0" * 64,
        "output_bytes": 10,
        "promise": outcome == "complete",
        "files_changed": 0,
        "lines_added": 0,
        "lines_removed": 0,
        "paths": [],
        "idle_iterations": 0,
        "repeat_count": 1,
    }
    return base | fields


def changed(added: int, removed: int, *paths: str) -> dict[str, Any]:
    return {
        "files_changed": len(paths),
        "lines_added": added,
        "lines_removed": removed,
        "paths": list(paths),
    }


@pytest.fixture
def workdir(runner: Runner) -> Path:
    """A finished loop: two runs, five iterations, a torn line at the end."""
    workdir = runner.workdir()
    state = workdir / ".ralph"
    state.mkdir()
    writer = HistoryWriter(state / "history.jsonl")
    for entry in (
        record(1, 1, "success", **changed(5, 1, "a.py", "b.py")),
        record(1, 2, "timeout", agent=None, error_type="QChatTimeout", attempts=2, duration_s=3),
        record(1, 3, "success", agent="kiro", duration_s=2.0, **changed(7, 3, "a.py")),
        record(2, 3, "success", duration_s=0.5, idle_iterations=1),
        record(2, 4, "complete", duration_s=1.5, **changed(0, 0, "c.bin")),
    ):
        writer.append(entry)
    with open(state / "history.jsonl", "ab") as stream:
        stream.write(b'{"number": 5, "outc')

    checkpoint = Checkpoint(
        task="work",
        iteration=4,
        status="complete",
        stop_reason="completion_promise",
        stop_message="the answer of iteration 4 holds 'LOOP_COMPLETE'",
        runs=2,
    )
    CheckpointStore(state).save(checkpoint)
    return workdir


def test_report_prints_the_totals_and_the_last_iterations(runner: Runner, workdir: Path) -> None:
    done = runner.run("report", "--workdir", str(workdir), "--last", "2")

    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("task work: complete (completion_promise) after iteration 4\n")
    assert "why:        the answer of iteration 4 holds 'LOOP_COMPLETE'" in out
    assert "iterations: 5 in 2 runs, 6 attempts; success 3, timeout 1, complete 1" in out
    assert "errors:     QChatTimeout 1" in out
    assert "agents:     sim 3, unknown 1, kiro 1" in out
    assert "8.0 s in calls (mean 1.60 s, p90 3.00 s, max 3.00 s)" in out
    assert "0:00:31 from the first start" in out
    assert "3 files, +12 -4 lines; 3 of 5 iterations changed something" in out
    assert "1 broken line(s) skipped: [6]" in out
    assert "line 6 is torn" in done.stderr  # the warning, on stderr

    table = out.split("the last 2 iterations:\n", 1)[1].splitlines()
    assert table[0].split() == [
        "#",
        "run",
        "started",
        "seconds",
        "outcome",
        "tries",
        "files",
        "+lines",
        "-lines",
        "idle",
        "same",
        "agent",
    ]
    assert table[1].split() == [
        "3",
        "2",
        "10:00:30",
        "0.50",
        "success",
        "1",
        "0",
        "+0",
        "-0",
        "1",
        "1",
        "sim",
    ]
    assert table[2].split()[:5] == ["4", "2", "10:00:40", "1.50", "complete"]
    assert len(table) == 3


def test_report_json_is_valid_and_holds_the_same_totals(runner: Runner, workdir: Path) -> None:
    done = runner.run("report", "--workdir", str(workdir), "--json")

    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)["tasks"][0]
    assert (task["status"], task["stop_reason"], task["running"]) == (
        "complete",
        "completion_promise",
        False,
    )
    assert (task["iterations"], task["runs"], task["attempts"]) == (5, 2, 6)
    assert task["outcomes"] == {"success": 3, "timeout": 1, "complete": 1}
    assert task["error_types"] == {"QChatTimeout": 1}
    assert task["agents"] == {"sim": 3, "kiro": 1, "unknown": 1}
    assert task["changes"] == {
        "measured": 5,
        "changed": 3,
        "files": 3,
        "files_exact": True,
        "lines_added": 12,
        "lines_removed": 4,
    }
    assert task["time"]["calls_s"] == 8.0 and task["time"]["span_s"] == 31.5
    assert task["skipped_lines"] == [6]
    assert [r["number"] for r in task["last"]] == [1, 2, 3, 3, 4]
    assert task["checkpoint"]["iteration"] == 4


def test_report_plot_writes_a_png(runner: Runner, workdir: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra is not installed")
    plot = runner.tmp_path / "loop.png"
    done = runner.run("report", "--workdir", str(workdir), "--plot", str(plot), "--json")

    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)  # the plot's note went to stderr, not into the JSON
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_report_plot_without_matplotlib_is_one_line_and_exit_1(
    runner: Runner, workdir: Path
) -> None:
    fake = runner.tmp_path / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")

    done = runner.run(
        "report",
        "--workdir",
        str(workdir),
        "--plot",
        str(runner.tmp_path / "loop.png"),
        env={"PYTHONPATH": str(fake.parent)},
    )

    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--plot needs matplotlib" in lines[0]
    assert not (runner.tmp_path / "loop.png").exists()


def test_report_where_no_loop_ran_exits_1(runner: Runner) -> None:
    empty = runner.workdir("empty")
    done = runner.run("report", "--workdir", str(empty))
    assert done.returncode == 1
    assert "no loop has run" in done.stderr
