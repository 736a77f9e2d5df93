"""Checkpoints: atomic files, unreadable checkpoints kept, git commits that only add.

Real files and a real git; no mocks.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ralph_supervisor.checkpoint import (
    FALLBACK_EMAIL,
    Checkpoint,
    CheckpointCorrupt,
    CheckpointStore,
    commit_message,
    commit_work_tree,
    write_json_atomic,
)

USER = ["-c", "user.name=Ada User", "-c", "user.email=ada@example.com"]


@pytest.fixture
def git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A git with no global or system configuration: no identity at all."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / "gitconfig"))
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "EMAIL"):
        monkeypatch.delenv(name, raising=False)


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.strip()


def make_repo(path: Path) -> str:
    """A repository with one commit of the user's; returns its sha."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    (path / "user.txt").write_text("the user's own work\n")
    git(path, "add", "user.txt")
    git(path, *USER, "commit", "-q", "-m", "user: first commit")
    return git(path, "rev-parse", "HEAD")


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    """Records of the checkpoint logger, whatever logging setup ran before."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("ralph_supervisor.checkpoint")
    handler = Keep(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# -- the file -----------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    checkpoint = Checkpoint(task="demo", iteration=12, successes=10, attempts=14)
    checkpoint.failures = {"timeout": 2}
    store.save(checkpoint)

    loaded = store.load()
    assert loaded == checkpoint
    data = json.loads(store.path.read_text())
    for key in ("iteration", "status", "started_at", "updated_at", "failures", "task"):
        assert key in data
    assert store.path.stat().st_mode & 0o777 == 0o600


def test_atomic_write_never_shows_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    write_json_atomic(path, {"n": 0, "pad": ""})
    stop = threading.Event()
    bad: list[str] = []

    def read_all_the_time() -> None:
        while not stop.is_set():
            text = path.read_text()
            try:
                json.loads(text)
            except ValueError:
                bad.append(text)

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for n in range(200):
            write_json_atomic(path, {"n": n, "pad": "x" * (n * 97 % 5000)})
    finally:
        stop.set()
        reader.join(10)

    assert not bad
    assert json.loads(path.read_text())["n"] == 199
    # No temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe garbage",
        b"[1, 2, 3]",
        json.dumps({"task": "t", "iteration": "seven", "status": "running"}).encode(),
        json.dumps(
            {"task": "t", "iteration": 3, "status": "sleeping", "started_at": "x"}
        ).encode(),
        json.dumps(
            {"task": "t", "iteration": True, "status": "running", "started_at": "x"}
        ).encode(),
    ],
    ids=["truncated", "binary", "list", "string-iteration", "bad-status", "bool-iteration"],
)
def test_unreadable_checkpoint_is_moved_aside(
    tmp_path: Path, content: bytes, captured: list[logging.LogRecord]
) -> None:
    store = CheckpointStore(tmp_path)
    store.path.write_bytes(content)

    with pytest.raises(CheckpointCorrupt):
        store.peek()
    assert store.path.exists()  # peek changes nothing

    assert store.load() is None
    assert not store.path.exists()
    kept = list(tmp_path.glob("checkpoint.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == content
    warnings = [r for r in captured if r.levelno == logging.WARNING]
    assert warnings and "unreadable" in warnings[0].getMessage()


def test_two_corrupt_files_in_one_second_are_both_kept(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for text in ("{one", "{two"):
        store.path.write_text(text)
        assert store.load() is None
    kept = sorted(p.read_text() for p in tmp_path.glob("checkpoint.json.corrupt-*"))
    assert kept == ["{one", "{two"]


def test_move_aside_for_fresh(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint(task="t", iteration=4))
    kept = store.move_aside("fresh")
    assert kept is not None and kept.name.startswith("checkpoint.json.fresh-")
    assert store.load() is None
    assert store.move_aside("fresh") is None


# -- git ----------------------------------------------------------------------


@pytest.mark.usefixtures("git_env")
def test_commit_adds_to_history_and_keeps_the_users_commits(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = make_repo(repo)
    state = repo / ".ralph"
    state.mkdir()
    (state / "checkpoint.json").write_text("{}")

    (repo / "agent.txt").write_text("the agent's work\n")
    (repo / "user.txt").write_text("edited by the agent\n")
    outcome = commit_work_tree(repo, state, commit_message(3, "demo"), body="Task: demo")

    assert outcome.committed and outcome.sha == git(repo, "rev-parse", "HEAD")
    assert git(repo, "log", "-1", "--format=%s") == "ralph: checkpoint after iteration 3 (demo)"
    assert git(repo, "rev-parse", "HEAD~1") == first
    # No identity was configured: the fallback one signed it.
    assert git(repo, "log", "-1", "--format=%ae") == FALLBACK_EMAIL
    # The state directory stays out of the user's history.
    tracked = git(repo, "ls-files").splitlines()
    assert sorted(tracked) == ["agent.txt", "user.txt"]
    assert (state / ".gitignore").read_text() == "*\n"

    # Nothing new: no commit, and no error.
    again = commit_work_tree(repo, state, commit_message(4))
    assert not again.committed and again.reason == "nothing to commit"

    # History only grows: the user's commit is still an ancestor of HEAD.
    (repo / "more.txt").write_text("more\n")
    assert commit_work_tree(repo, state, commit_message(5)).committed
    subprocess.run(
        ["git", "merge-base", "--is-ancestor", first, "HEAD"], cwd=repo, check=True, timeout=30
    )
    assert git(repo, "rev-list", "--count", "HEAD") == "3"


@pytest.mark.usefixtures("git_env")
def test_commit_uses_the_configured_identity(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_repo(repo)
    git(repo, "config", "user.name", "Grace Hopper")
    git(repo, "config", "user.email", "grace@example.com")
    (repo / "x.txt").write_text("x\n")

    assert commit_work_tree(repo, repo / ".ralph", commit_message(1)).committed
    assert git(repo, "log", "-1", "--format=%an <%ae>") == "Grace Hopper <grace@example.com>"


@pytest.mark.usefixtures("git_env")
def test_commit_in_a_subdirectory_commits_only_that_subdirectory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_repo(repo)
    task = repo / "task"
    task.mkdir()
    (task / "work.txt").write_text("work\n")
    (repo / "elsewhere.txt").write_text("not the task's\n")

    assert commit_work_tree(task, task / ".ralph", commit_message(1)).committed
    assert git(repo, "show", "--name-only", "--format=", "HEAD").splitlines() == ["task/work.txt"]
    assert "elsewhere.txt" in git(repo, "status", "--porcelain")


@pytest.mark.usefixtures("git_env")
def test_unborn_branch_gets_its_first_commit(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("a\n")
    assert commit_work_tree(repo, repo / ".ralph", commit_message(1)).committed
    assert git(repo, "rev-list", "--count", "HEAD") == "1"


@pytest.mark.usefixtures("git_env")
def test_a_merge_in_progress_is_left_alone(
    tmp_path: Path, captured: list[logging.LogRecord]
) -> None:
    repo = tmp_path / "repo"
    make_repo(repo)
    git(repo, "checkout", "-q", "-b", "side")
    (repo / "user.txt").write_text("side\n")
    git(repo, *USER, "commit", "-q", "-am", "side")
    git(repo, "checkout", "-q", "main")
    (repo / "user.txt").write_text("main\n")
    git(repo, *USER, "commit", "-q", "-am", "main")
    conflicted = subprocess.run(
        ["git", *USER, "merge", "side"], cwd=repo, capture_output=True, timeout=30
    )
    assert conflicted.returncode != 0
    head = git(repo, "rev-parse", "HEAD")

    outcome = commit_work_tree(repo, repo / ".ralph", commit_message(2))
    assert not outcome.committed and "merge" in outcome.reason
    assert git(repo, "rev-parse", "HEAD") == head
    assert any("merge" in r.getMessage() for r in captured if r.levelno == logging.WARNING)


def test_not_a_repository_is_not_an_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    outcome = commit_work_tree(plain, plain / ".ralph", commit_message(1))
    assert not outcome.committed and outcome.reason == "not a git work tree"
    assert not (plain / ".git").exists()


@pytest.mark.usefixtures("git_env")
def test_a_failing_git_is_a_warning(tmp_path: Path, captured: list[logging.LogRecord]) -> None:
    repo = tmp_path / "repo"
    make_repo(repo)
    (repo / "x.txt").write_text("x\n")
    # Another git holds the index: add cannot take its lock.
    (repo / ".git" / "index.lock").write_text("")

    outcome = commit_work_tree(repo, repo / ".ralph", commit_message(1))
    assert not outcome.committed
    assert any(r.levelno == logging.WARNING for r in captured)
    os.unlink(repo / ".git" / "index.lock")
