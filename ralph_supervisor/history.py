"""The iteration history: one JSON line per iteration, and what each changed.

    STATE_DIR/
      history.jsonl     one record per iteration, appended (HistoryWriter)
      snapshot.index    a git index of our own (WorkTreeProbe)

    loop iteration N
      |   WorkTreeProbe.snapshot()   tree before (the tree after N-1)
      +-> the call
      |   WorkTreeProbe.snapshot()   tree after
      |   WorkTreeProbe.diff()       files, +lines, -lines
      |   similarity()               this answer against the last one
      +-> HistoryWriter.append(record)

Appending: a record is one line, written by one os.write on a descriptor
opened with O_APPEND, then fsynced. A crash can still leave a torn last
line; read_history skips it with a warning, and the next append ends it
with a newline first, so that the new record starts a line of its own.

Changes: the work tree is snapshotted as a git tree object, with our own
index (GIT_INDEX_FILE) rather than the user's:

    GIT_INDEX_FILE=STATE_DIR/snapshot.index git add -A -- . ':(exclude)STATE'
    GIT_INDEX_FILE=STATE_DIR/snapshot.index git write-tree
    git diff --numstat TREE_BEFORE TREE_AFTER

So files the agent has not committed count, and the user's index, HEAD,
refs and stash list are never touched: git only gains objects that nothing
refers to, which `git gc` prunes in time. The index is kept between
iterations, so `git add` rehashes only the files whose stat changed.

Known shortcoming: every file that is neither ignored nor in the state
directory is hashed into the object store, large untracked files included
(a data set the agent downloads costs its size once in .git/objects until
gc prunes it). Changes inside a submodule show only when its HEAD moves.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ralph_supervisor.checkpoint import _git, exclude_state_dir, is_git_work_tree

log = logging.getLogger(__name__)

HISTORY_NAME = "history.jsonl"
SNAPSHOT_INDEX_NAME = "snapshot.index"

# Paths kept per record; the count is always whole.
MAX_PATHS = 50

# Answers are compared word by word, on at most this many words from each
# end: the head and tail of an answer are where a spinning agent repeats
# itself. Without autojunk (which drops frequent words, so that a table of
# "|" matched itself at 0.5), SequenceMatcher is quadratic in the words it
# sees; 2 x 500 bounds the worst case near 0.4 s.
SIMILARITY_WORDS = 500

_WORD = re.compile(r"\S+")


# ---------------------------------------------------------------------------
# Records


@dataclass
class Change:
    """What one iteration changed in the work tree."""

    files: int = 0
    added: int = 0
    removed: int = 0
    paths: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.files > 0


def output_digest(text: str) -> tuple[str, int]:
    """The SHA-256 (hex) and the size in bytes of an output, as UTF-8."""
    data = text.encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).hexdigest(), len(data)


class HistoryWriter:
    """Appends records to STATE_DIR/history.jsonl, one whole line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record and fsync it; OSError goes to the caller."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode("utf-8", "surrogateescape")

        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if self._ends_torn(fd):
                data = b"\n" + data
            self._write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ends_torn(self, fd: int) -> bool:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return False
        log.warning(
            "history %s ends in a torn line (a crash while writing it); it is skipped "
            "when read, and the next record starts a new line",
            self.path,
            extra={"path": str(self.path)},
        )
        return True

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        # One write puts a whole line into a regular file at once; the loop
        # is only for a short write (a full disk, a signal), which would
        # leave a torn line whatever we did.
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]


@dataclass
class History:
    """The records of a history file, and the lines that were not records."""

    records: list[dict[str, Any]]
    skipped: list[int]


def read_history(path: Path) -> History:
    """Every record of a history file; torn or broken lines skipped, with a warning."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return History([], [])

    records: list[dict[str, Any]] = []
    skipped: list[int] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8", "surrogateescape"))
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
            continue

        skipped.append(number)
        torn = number == len(lines)  # no newline after it: cut while written
        log.warning(
            "history %s: line %d is %s; skipped",
            path,
            number,
            "torn (a crash while writing it)" if torn else "not a record",
            extra={"path": str(path), "line": number},
        )
    return History(records, skipped)


# ---------------------------------------------------------------------------
# Answers


def similarity(previous: str, current: str, threshold: float) -> float:
    """How alike two answers are, from 0 to 1, compared word by word.

    Below `threshold` the value may be an upper bound rather than the exact
    ratio: quick_ratio is cheap and enough to say "not a repeat".
    """
    if previous == current:
        return 1.0
    matcher = difflib.SequenceMatcher(
        None, _bounded_words(previous), _bounded_words(current), autojunk=False
    )
    for bound in (matcher.real_quick_ratio, matcher.quick_ratio):
        upper = bound()
        if upper < threshold:
            return upper
    return matcher.ratio()


def _bounded_words(text: str) -> list[str]:
    words = _WORD.findall(text)
    if len(words) <= 2 * SIMILARITY_WORDS:
        return words
    return words[:SIMILARITY_WORDS] + words[-SIMILARITY_WORDS:]


# ---------------------------------------------------------------------------
# The work tree


class SnapshotFailed(Exception):
    """git could not snapshot the work tree; the message says why."""


class WorkTreeProbe:
    """Snapshots of a git work tree, and what changed between two of them."""

    def __init__(self, workdir: Path, state_dir: Path) -> None:
        self.workdir = Path(workdir)
        self.state_dir = Path(state_dir)
        self.index = self.state_dir / SNAPSHOT_INDEX_NAME
        self._pathspec = ["--", ".", *self._exclude_state_dir()]

    def _exclude_state_dir(self) -> list[str]:
        work = os.path.realpath(self.workdir)
        state = os.path.realpath(self.state_dir)
        if os.path.commonpath([work, state]) != work or state == work:
            return []
        return [f":(exclude,literal){os.path.relpath(state, work)}"]

    def start(self) -> bool:
        """Whether the workdir is a git work tree; gets our index ready if so."""
        if not is_git_work_tree(self.workdir):
            return False
        try:
            exclude_state_dir(self.workdir, self.state_dir)
        except OSError as error:
            log.debug("cannot write the state directory's .gitignore: %s", error)

        # We hold the pidfile: a lock left here is from a run that died
        # in `git add`, and would fail every snapshot after it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.index}.lock")
        return True

    def snapshot(self) -> str:
        """The work tree now, as a git tree id; SnapshotFailed says why not."""
        env = {"GIT_INDEX_FILE": str(self.index)}
        added = self._run(["add", "-A", *self._pathspec], env)
        if added.returncode != 0:
            # A corrupt index of ours is rebuilt once; it only costs time.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.index)
            added = self._run(["add", "-A", *self._pathspec], env)
            if added.returncode != 0:
                raise SnapshotFailed(f"git add: {_last_line(added.stderr)}")

        tree = self._run(["write-tree"], env)  # rewrites the index too, with its tree
        # git writes its index with the umask's mode; every file of the state
        # directory is private. (A umask for git itself would also narrow the
        # objects it adds to the user's repository.)
        with contextlib.suppress(OSError):
            os.chmod(self.index, 0o600)
        sha = tree.stdout.strip()
        if tree.returncode != 0 or not sha:
            raise SnapshotFailed(f"git write-tree: {_last_line(tree.stderr)}")
        return sha

    def diff(self, before: str, after: str) -> Change:
        """Files, added and removed lines from one tree to the other."""
        if before == after:
            return Change()
        numstat = self._run(
            [
                "diff",
                "--numstat",
                "-z",
                "--no-renames",
                "--no-ext-diff",
                "--no-textconv",
                "--relative",
                before,
                after,
            ]
        )
        if numstat.returncode != 0:
            raise SnapshotFailed(f"git diff: {_last_line(numstat.stderr)}")
        return parse_numstat(numstat.stdout)

    def _run(
        self, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            return _git(args, self.workdir, extra_env=env)
        except (OSError, subprocess.SubprocessError) as error:
            raise SnapshotFailed(f"git {args[0]}: {error}") from None


def parse_numstat(output: str) -> Change:
    """`git diff --numstat -z` output as a Change; binary files count no lines."""
    change = Change()
    for entry in output.split("\0"):
        added, _, rest = entry.partition("\t")
        removed, _, path = rest.partition("\t")
        if not path:
            continue
        change.files += 1
        change.added += int(added) if added.isdigit() else 0
        change.removed += int(removed) if removed.isdigit() else 0
        if len(change.paths) < MAX_PATHS:
            change.paths.append(path)
    return change


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"
