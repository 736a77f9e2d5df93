"""Checkpoints: a task's progress on disk, written atomically, and git commits.

    STATE_DIR/
      checkpoint.json                 the task's progress (this module)
      checkpoint.json.corrupt-TIME    a checkpoint that could not be read, kept
      checkpoint.json.fresh-TIME      the one `start --fresh` moved aside
      iterations/0001.log             each iteration's output (loop.py)
      history.jsonl                   one line per iteration (history.py)
      snapshot.index                  history.py's own git index
      .gitignore                      "*": state never lands in the user's commits

A checkpoint is written to a temporary file in its own directory, fsynced,
renamed over the old one, and the directory is fsynced: a crash at any moment
leaves the old checkpoint or the new one, never a mix of both.

When the working directory is a git work tree, a checkpoint also commits it
(`git add -A`, then `git commit`). History is only ever added to: nothing
here resets, rebases, amends or otherwise rewrites a commit, because the
user's own commits live on the same branch. A git failure is a warning; the
loop goes on without that commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ralph_supervisor.config import ensure_private_dir

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.json"
SCHEMA_VERSION = 1

RUNNING, COMPLETE, STOPPED, FAILED = "running", "complete", "stopped", "failed"
STATUSES = (RUNNING, COMPLETE, STOPPED, FAILED)

# The identity a checkpoint commit falls back to when git has none (a fresh
# container, a service user): git would refuse to commit otherwise.
FALLBACK_NAME = "ralph-supervisor"
FALLBACK_EMAIL = "ralph-supervisor@localhost"

# One git command may take this long; a commit of a large tree on a slow
# disk takes seconds, and a hung one must not hold the loop for ever.
GIT_TIMEOUT = 120.0

# Operations that a commit of ours would conclude or confuse.
_GIT_IN_PROGRESS = {
    "MERGE_HEAD": "a merge",
    "CHERRY_PICK_HEAD": "a cherry-pick",
    "REVERT_HEAD": "a revert",
    "rebase-merge": "a rebase",
    "rebase-apply": "a rebase or git am",
}

# Tasks of one process may share a repository; git takes index.lock and a
# second commit at the same moment would fail. One commit at a time.
_git_lock = threading.Lock()


class CheckpointCorrupt(ValueError):
    """A checkpoint file that is not JSON, or not a checkpoint's shape."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC with a Z, as checkpoints carry it."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _file_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass
class Checkpoint:
    """A task's progress: where it is, how it has gone, and why it stopped."""

    task: str
    iteration: int = 0
    status: str = RUNNING
    started_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    stop_reason: str | None = None
    stop_message: str | None = None
    successes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    consecutive_failures: int = 0
    idle_iterations: int = 0
    repeat_count: int = 0
    runtime_s: float = 0.0
    last_outcome: str | None = None
    last_error: str | None = None
    workdir: str | None = None
    prompt_file: str | None = None
    runs: int = 1
    pid: int | None = None
    commit: str | None = None
    version: int = SCHEMA_VERSION

    @property
    def failed_iterations(self) -> int:
        return sum(self.failures.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Checkpoint:
        """Rebuild a checkpoint; CheckpointCorrupt names the first bad field."""
        if not isinstance(data, dict):
            raise CheckpointCorrupt(f"expected a JSON object, got {type(data).__name__}")

        checked: dict[str, Any] = {}
        for name, kind, required in _FIELDS:
            if name not in data:
                if required:
                    raise CheckpointCorrupt(f"the field {name!r} is missing")
                continue
            checked[name] = _check_field(name, data[name], kind)

        if checked["status"] not in STATUSES:
            raise CheckpointCorrupt(f"status: expected one of {STATUSES}, got {data['status']!r}")
        if checked["iteration"] < 0:
            raise CheckpointCorrupt("iteration: expected a count >= 0")
        return cls(**checked)


# (name, type, required). Fields a later version adds are optional here, so
# an older checkpoint still loads.
_FIELDS: tuple[tuple[str, Any, bool], ...] = (
    ("task", str, True),
    ("iteration", int, True),
    ("status", str, True),
    ("started_at", str, True),
    ("updated_at", str, False),
    ("stop_reason", (str, type(None)), False),
    ("stop_message", (str, type(None)), False),
    ("successes", int, False),
    ("failures", dict, False),
    ("attempts", int, False),
    ("consecutive_failures", int, False),
    ("idle_iterations", int, False),
    ("repeat_count", int, False),
    ("runtime_s", (int, float), False),
    ("last_outcome", (str, type(None)), False),
    ("last_error", (str, type(None)), False),
    ("workdir", (str, type(None)), False),
    ("prompt_file", (str, type(None)), False),
    ("runs", int, False),
    ("pid", (int, type(None)), False),
    ("commit", (str, type(None)), False),
    ("version", int, False),
)


def _check_field(name: str, value: Any, kind: Any) -> Any:
    # bool is an int to isinstance, but `"iteration": true` is corruption.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CheckpointCorrupt(f"{name}: unexpected value {value!r}")
    if name == "failures":
        for key, count in value.items():
            if isinstance(count, bool) or not isinstance(count, int):
                raise CheckpointCorrupt(f"failures.{key}: expected a count, got {count!r}")
        return dict(value)
    if name == "runtime_s":
        return float(value)
    return value


# ---------------------------------------------------------------------------
# Atomic files


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX needs the directory synced)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new.

    Temporary file in the same directory (a rename across file systems is a
    copy), fsync, rename, fsync the directory.
    """
    directory = path.parent
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    fsync_dir(directory)


def write_json_atomic(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_atomic(path, text.encode("utf-8"))


def move_aside(path: Path, label: str) -> Path | None:
    """Rename `path` to `path.LABEL-TIME` (never over another file); None if absent."""
    stamp = _file_stamp()
    for attempt in range(100):
        suffix = f".{label}-{stamp}" + (f"-{attempt}" if attempt else "")
        target = path.with_name(path.name + suffix)
        if target.exists():
            continue
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        return target
    raise FileExistsError(f"cannot find a free name to move {path} aside")


# ---------------------------------------------------------------------------
# The checkpoint file


class CheckpointStore:
    """STATE_DIR/checkpoint.json: load, save, and move aside."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / CHECKPOINT_NAME

    def peek(self) -> Checkpoint | None:
        """The checkpoint, or None when there is none; CheckpointCorrupt if unreadable.

        Changes nothing on disk: for --dry-run and `status`.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise CheckpointCorrupt(f"cannot read it: {error.strerror or error}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointCorrupt(f"not JSON: {error}") from None
        return Checkpoint.from_dict(data)

    def load(self) -> Checkpoint | None:
        """The checkpoint to resume from, or None to start anew.

        An unreadable checkpoint is moved aside with a warning, never
        silently dropped: it may be all that is left of hours of progress.
        """
        try:
            return self.peek()
        except CheckpointCorrupt as error:
            kept = move_aside(self.path, "corrupt")
            log.warning(
                "checkpoint %s is unreadable (%s); moved it to %s and starting anew",
                self.path,
                error,
                kept,
                extra={"path": str(self.path), "kept_as": str(kept)},
            )
            return None

    def save(self, checkpoint: Checkpoint) -> None:
        checkpoint.updated_at = utc_now()
        ensure_private_dir(self.state_dir)
        write_json_atomic(self.path, checkpoint.to_dict())

    def move_aside(self, label: str) -> Path | None:
        return move_aside(self.path, label)


# ---------------------------------------------------------------------------
# Git


@dataclass
class GitOutcome:
    """What a checkpoint commit did: committed (with its sha) or why not."""

    committed: bool
    sha: str | None = None
    reason: str = ""


def _git(
    args: list[str],
    cwd: Path,
    *,
    timeout: float = GIT_TIMEOUT,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one git command; kill its whole process group if it overruns.

    subprocess.run's timeout kills git alone, and a hook or credential
    helper it started would keep the pipes open and the call hanging.
    `extra_env` adds variables (history.py points GIT_INDEX_FILE at its own
    index).
    """
    env = dict(os.environ) | (extra_env or {})
    env["GIT_TERMINAL_PROMPT"] = "0"  # never wait for a password nobody will type
    env.setdefault("LC_ALL", "C")
    process = subprocess.Popen(
        ["git", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def is_git_work_tree(workdir: Path) -> bool:
    """Whether `workdir` is inside a git work tree (False without git)."""
    try:
        result = _git(["rev-parse", "--is-inside-work-tree"], workdir, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and result.stdout.strip() == "true"


def exclude_state_dir(workdir: Path, state_dir: Path) -> bool:
    """Keep the state directory out of commits when it lies inside the workdir.

    A .gitignore of `*` inside it ignores everything there, itself included,
    without touching any file of the user's. Returns whether it is inside.
    """
    work = Path(os.path.realpath(workdir))
    state = Path(os.path.realpath(state_dir))
    if state == work or work not in state.parents:
        return False

    ignore = state / ".gitignore"
    with contextlib.suppress(OSError):
        if ignore.read_text(encoding="utf-8") == "*\n":
            return True
    ensure_private_dir(state)
    write_atomic(ignore, b"*\n", mode=0o644)
    return True


def _operation_in_progress(workdir: Path) -> str | None:
    for name, description in _GIT_IN_PROGRESS.items():
        result = _git(["rev-parse", "--git-path", name], workdir, timeout=30)
        if result.returncode != 0:
            continue
        path = Path(result.stdout.strip())
        if not path.is_absolute():
            path = workdir / path
        if path.exists():
            return description
    return None


def _identity_fallbacks(workdir: Path) -> list[str]:
    """`-c user.name=... -c user.email=...` for whatever git lacks."""
    ok = all(
        _git(["var", ident], workdir, timeout=30).returncode == 0
        for ident in ("GIT_AUTHOR_IDENT", "GIT_COMMITTER_IDENT")
    )
    if ok:
        return []

    options: list[str] = []
    for key, fallback in (("user.name", FALLBACK_NAME), ("user.email", FALLBACK_EMAIL)):
        configured = _git(["config", "--get", key], workdir, timeout=30)
        if configured.returncode != 0 or not configured.stdout.strip():
            options += ["-c", f"{key}={fallback}"]
    return options


def commit_work_tree(
    workdir: Path,
    state_dir: Path,
    message: str,
    *,
    body: str = "",
) -> GitOutcome:
    """Commit everything under `workdir` with `message`; never raises.

    Only the workdir's own paths are staged and committed (`-- .`), so a
    workdir that is a subdirectory of a larger repository does not sweep up
    the rest of it. Hooks are skipped (--no-verify) and signing is off: a
    checkpoint is a mechanical snapshot, taken unattended, and a hook that
    fails on work in progress or a pinentry that waits for a person would
    cost every checkpoint. Nothing to commit is not a failure.
    """
    workdir = Path(workdir)
    with _git_lock:
        try:
            return _commit(workdir, Path(state_dir), message, body)
        except (OSError, subprocess.SubprocessError) as error:
            reason = f"git failed: {error}"
    log.warning(
        "checkpoint commit skipped in %s: %s",
        workdir,
        reason,
        extra={"workdir": str(workdir)},
    )
    return GitOutcome(False, reason=reason)


def _commit(workdir: Path, state_dir: Path, message: str, body: str) -> GitOutcome:
    if not is_git_work_tree(workdir):
        return GitOutcome(False, reason="not a git work tree")

    busy = _operation_in_progress(workdir)
    if busy is not None:
        return _warn(workdir, f"{busy} is in progress; leaving the repository alone")

    exclude_state_dir(workdir, state_dir)

    added = _git(["add", "-A", "--", "."], workdir)
    if added.returncode != 0:
        return _warn(workdir, f"git add failed: {_last_line(added.stderr)}")

    staged = _git(["diff", "--cached", "--quiet", "--", "."], workdir)
    if staged.returncode == 0:
        log.debug("checkpoint: nothing to commit in %s", workdir)
        return GitOutcome(False, reason="nothing to commit")
    if staged.returncode != 1:
        return _warn(workdir, f"git diff failed: {_last_line(staged.stderr)}")

    command = [*_identity_fallbacks(workdir), "commit", "--quiet", "--no-verify"]
    command += ["--no-gpg-sign", "-m", message]
    if body:
        command += ["-m", body]
    committed = _git([*command, "--", "."], workdir)
    if committed.returncode != 0:
        detail = _last_line(committed.stderr) or _last_line(committed.stdout)
        return _warn(workdir, f"git commit failed: {detail}")

    head = _git(["rev-parse", "HEAD"], workdir, timeout=30)
    sha = head.stdout.strip() if head.returncode == 0 else None
    log.info(
        "checkpoint committed in %s: %s",
        workdir,
        message,
        extra={"workdir": str(workdir), "commit": sha},
    )
    return GitOutcome(True, sha=sha, reason="committed")


def _warn(workdir: Path, reason: str) -> GitOutcome:
    log.warning(
        "checkpoint commit skipped in %s: %s",
        workdir,
        reason,
        extra={"workdir": str(workdir)},
    )
    return GitOutcome(False, reason=reason)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def commit_message(iteration: int, task: str | None = None) -> str:
    """The subject of a checkpoint commit: it names the iteration (and task)."""
    subject = f"ralph: checkpoint after iteration {iteration}"
    return f"{subject} ({task})" if task else subject
