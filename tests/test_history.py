"""The iteration history: appends, torn lines, answer similarity, tree snapshots."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from ralph_supervisor.history import (
    MAX_PATHS,
    HistoryWriter,
    WorkTreeProbe,
    output_digest,
    parse_numstat,
    read_history,
    similarity,
)


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Ada", "-c", "user.email=ada@example.com", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


# -- the file -------------------------------------------------------------------


def test_records_are_whole_lines_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(path)
    for number in (1, 2, 3):
        writer.append({"number": number, "note": "déjà\nvu"})

    assert path.read_bytes().count(b"\n") == 3
    assert os.stat(path).st_mode & 0o777 == 0o600
    history = read_history(path)
    assert [r["number"] for r in history.records] == [1, 2, 3]
    assert history.records[0]["note"] == "déjà\nvu"
    assert history.skipped == []


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_a_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(path)
    writer.append({"number": 1})
    with open(path, "ab") as stream:
        stream.write(b'{"number": 2, "outc')  # a crash in the middle of a write

    with caplog.at_level(logging.WARNING, logger="ralph_supervisor.history"):
        torn = read_history(path)
    assert [r["number"] for r in torn.records] == [1]
    assert torn.skipped == [2]
    assert "line 2 is torn" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ralph_supervisor.history"):
        writer.append({"number": 2})
    assert "torn line" in caplog.text

    mended = read_history(path)
    assert [r["number"] for r in mended.records] == [1, 2]
    assert mended.skipped == [2]
    assert path.read_bytes().endswith(b'\n{"number":2}\n')


def test_a_missing_history_is_empty(tmp_path: Path) -> None:
    history = read_history(tmp_path / "none.jsonl")
    assert (history.records, history.skipped) == ([], [])


def test_output_digest_is_sha256_and_utf8_size() -> None:
    assert output_digest("é") == (hashlib.sha256("é".encode()).hexdigest(), 2)


# -- answers --------------------------------------------------------------------


def test_similarity_sees_repeats_but_not_progress_reports() -> None:
    assert similarity("Still working.\n", "Still working.\n", 0.95) == 1.0

    # The simulator's checklist answers, one item apart: progress, not a repeat.
    first = "Working on item 1 of 12: step 1\nDone: ticked item 1 in PROMPT.md; 11 left.\n"
    second = "Working on item 2 of 12: step 2\nDone: ticked item 2 in PROMPT.md; 10 left.\n"
    assert similarity(first, second, 0.95) < 0.95

    # A long answer that differs by a timestamp is the same answer.
    body = " ".join(f"word{n}" for n in range(400))
    assert similarity(f"{body} at 10:00", f"{body} at 10:01", 0.95) >= 0.95
    assert similarity("completely different", body, 0.95) < 0.5


def test_similarity_stays_fast_on_huge_repetitive_answers() -> None:
    huge = "| - | - |\n" * 200_000
    started = time.monotonic()
    assert similarity(huge, huge + "x", 0.95) >= 0.95
    assert time.monotonic() - started < 2.0


# -- the work tree --------------------------------------------------------------


def test_parse_numstat_counts_files_lines_and_binaries() -> None:
    change = parse_numstat("3\t1\ta.py\x00-\t-\tlogo.png\x000\t7\tweird\tname.txt\x00")
    assert (change.files, change.added, change.removed) == (3, 3, 8)
    assert change.paths == ["a.py", "logo.png", "weird\tname.txt"]

    many = parse_numstat("".join(f"1\t0\tf{n}\x00" for n in range(MAX_PATHS + 5)))
    assert many.files == MAX_PATHS + 5 and len(many.paths) == MAX_PATHS


def test_snapshots_measure_uncommitted_work_and_leave_the_repository_alone(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("one\ntwo\n")
    (repo / ".gitignore").write_text("build/\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "mine")
    (repo / "a.txt").write_text("one\nTWO\nthree\n")  # the user's own unstaged edit
    git(repo, "stash", "-q")
    git(repo, "stash", "apply", "-q")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")

    head = git(repo, "rev-parse", "HEAD")
    index_bytes = (repo / ".git" / "index").read_bytes()
    status = git(repo, "status", "--porcelain")
    stashes = git(repo, "stash", "list")

    state = repo / ".ralph"
    probe = WorkTreeProbe(repo, state)
    state.mkdir()
    assert probe.start()
    before = probe.snapshot()
    assert probe.snapshot() == before  # nothing changed: the same tree
    assert os.stat(state / "snapshot.index").st_mode & 0o777 == 0o600
    assert probe.diff(before, before).changed is False

    # The agent's work: an edit, a new file, a binary, an ignored build and
    # the state directory's own files; none of it committed.
    (repo / "a.txt").write_text("one\nTWO\nthree\nfour\n")
    (repo / "new.py").write_text("print(1)\nprint(2)\n")
    (repo / "logo.bin").write_bytes(b"\x00\x01" * 100)
    (repo / "build").mkdir()
    (repo / "build" / "out.o").write_text("ignored\n")
    (state / "history.jsonl").write_text("{}\n")
    after = probe.snapshot()

    change = probe.diff(before, after)
    assert sorted(change.paths) == ["a.txt", "logo.bin", "new.py"]
    assert (change.files, change.added, change.removed) == (3, 3, 0)

    # The user's repository is as it was, but for the agent's files.
    assert git(repo, "rev-parse", "HEAD") == head
    assert (repo / ".git" / "index").read_bytes() == index_bytes
    assert git(repo, "stash", "list") == stashes
    assert status in git(repo, "status", "--porcelain").replace("?? logo.bin\n", "")
    assert "new.py" not in git(repo, "ls-files")


def test_a_workdir_below_the_repository_measures_only_itself(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "task").mkdir(parents=True)
    git(repo, "init", "-q")
    probe = WorkTreeProbe(repo / "task", repo / "task" / ".ralph")
    assert probe.start()
    before = probe.snapshot()
    (repo / "elsewhere.txt").write_text("not ours\n")
    (repo / "task" / "mine.txt").write_text("ours\n")
    change = probe.diff(before, probe.snapshot())
    assert change.paths == ["mine.txt"]


def test_a_plain_directory_has_no_snapshots(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert WorkTreeProbe(plain, plain / ".ralph").start() is False


def test_a_lock_left_by_a_killed_snapshot_is_cleared(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    state = tmp_path / "state"
    state.mkdir()
    (state / "snapshot.index.lock").write_text("")
    probe = WorkTreeProbe(repo, state)
    assert probe.start()
    assert probe.snapshot()


def test_history_lines_are_json(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    HistoryWriter(path).append({"paths": ["a b", "c\td"], "similarity": None})
    assert json.loads(path.read_text()) == {"paths": ["a b", "c\td"], "similarity": None}
