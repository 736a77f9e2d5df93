"""Crash consistency: SIGKILL `ralph-supervisor start` at random moments.

A Ralph loop on a long checklist, checkpointing (and committing) after every
iteration, is killed with SIGKILL to its whole process group again and
again, then started again. After every kill:

- once a checkpoint was written, checkpoint.json exists, is valid JSON of a
  checkpoint's shape, and its iteration never goes backwards; no checkpoint
  was ever found corrupt and moved aside;
- the restart resumes from exactly that checkpoint (its log says so, and its
  first iteration is the next one);
- git history only grows: each HEAD descends from the previous HEAD, and the
  checkpoint's commit is in HEAD's history;
- nothing of the killed run is left running before the next one starts.

Half the kills land at a random moment after the start (start-up included),
half at a random moment just after the loop made progress (mid-iteration,
mid-commit, mid-checkpoint). A last run goes on to a limit, to show that the
repository and the checkpoint still work after all that.

test_start_state_files_are_private checks the modes of the files `start`
writes, and the address its health server listens on.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until

from ralph_supervisor.checkpoint import Checkpoint

from .conftest import describe, is_alive, sizes

CLI = [sys.executable, "-m", "ralph_supervisor"]

CONFIG = """\
performance:
  max_concurrent: 2
adapter:
  max_retries: 2
  retry_delay: 0.05
  kill_grace: 0.3
breaker:
  storage: memory
supervisor:
  drain_timeout: 5
  hang_grace: 2
"""


class StartRuns:
    """Runs `ralph-supervisor start` on one workdir, one process at a time."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.workdir = tmp_path / "work"
        self.workdir.mkdir()
        self.config = tmp_path / "ralph.yaml"
        self.config.write_text(CONFIG)
        home = tmp_path / "home"
        home.mkdir()
        self.tag = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("QCHAT_")}
        self.env.update(
            HOME=str(home),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_CONFIG_GLOBAL=str(home / "gitconfig"),
            QCHAT_SIM_WORK_DIR="work",
            QCHAT_SIM_LATENCY="uniform:0.02:0.2",
            RALPH_RELIABILITY_RUN=self.tag,
        )
        self.count = 0

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        self.count += 1
        out = self.tmp_path / f"run-{self.count}.out"
        err = self.tmp_path / f"run-{self.count}.err"
        command = [*CLI, "start", "--agent", "sim", "--workdir", str(self.workdir)]
        command += ["--health-port", "0", "--config", str(self.config), *args]
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(
                command,
                cwd=self.tmp_path,
                env=self.env | env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=lambda: os.umask(0o022),
            )
        process.err_path = err  # type: ignore[attr-defined]
        return process

    def log(self, process: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
        lines = []
        text = Path(process.err_path).read_text(errors="replace")  # type: ignore[attr-defined]
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass  # the last line, cut by the kill
        return lines

    def stderr(self, process: subprocess.Popen[bytes]) -> str:
        return Path(process.err_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)

    def ours(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter(["pid"]):
            try:
                tag = process.environ().get("RALPH_RELIABILITY_RUN")
                if tag == self.tag and is_alive(process):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def checkpoint_path(self) -> Path:
        return self.workdir / ".ralph" / "checkpoint.json"

    def iteration(self) -> int:
        try:
            return int(json.loads(self.checkpoint_path().read_text())["iteration"])
        except (OSError, ValueError, KeyError):
            return -1

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").stdout.strip()

    def descends(self, ancestor: str, descendant: str = "HEAD") -> bool:
        result = self.git("merge-base", "--is-ancestor", ancestor, descendant, check=False)
        return result.returncode == 0


def make_repository(runs: StartRuns, items: int) -> str:
    workdir = runs.workdir
    (workdir / "PROMPT.md").write_text(
        "# A long task\n\n" + "".join(f"- [ ] step {n}\n" for n in range(1, items + 1))
    )
    (workdir / "notes.txt").write_text("the user's own notes\n")
    runs.git("init", "-q", "-b", "main")
    runs.git("add", "-A")
    runs.git("-c", "user.name=Ada", "-c", "user.email=ada@example.com", "commit", "-qm", "mine")
    return runs.head()


def read_valid_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint, or fail: it must be JSON of a checkpoint's shape."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as error:
        pytest.fail(f"checkpoint.json is not JSON ({error}): {raw[:300]!r}")
    Checkpoint.from_dict(data)  # raises CheckpointCorrupt on a bad shape
    assert isinstance(data["iteration"], int) and data["iteration"] >= 0
    return data


def resumed_from(log: list[dict[str, Any]]) -> int | None:
    for record in log:
        message = str(record.get("message", ""))
        if "resuming after iteration" in message:
            return int(record["iteration"])
    return None


def first_iteration(log: list[dict[str, Any]]) -> int | None:
    for record in log:
        if record.get("outcome") and isinstance(record.get("iteration"), int):
            return int(record["iteration"])
    return None


@pytest.mark.parametrize("kills", sizes(6, 50, bounded_timeout=240, full_timeout=1500))
def test_sigkill_at_random_moments_never_loses_a_checkpoint_or_history(
    tmp_path: Path, kills: int, report
) -> None:
    runs = StartRuns(tmp_path)
    users_commit = make_repository(runs, items=kills * 15 + 30)
    rng = random.Random()
    heads = [users_commit]
    iterations: list[int] = []
    resumes = 0
    written = False
    kill_delays = []
    phases = collections.Counter[str]()
    started = time.monotonic()

    for round_number in range(kills):
        before = runs.iteration()
        process = runs.start("--checkpoint-interval", "1")
        try:
            if round_number % 2 == 0:
                delay = rng.uniform(0.2, 3.0)
                time.sleep(delay)
            else:
                made_progress = wait_until(lambda b=before: runs.iteration() > b, timeout=60)
                assert made_progress, runs.stderr(process)[-3000:]
                delay = rng.uniform(0.0, 0.4)
                time.sleep(delay)
            kill_delays.append(delay)
            assert process.poll() is None, f"start ended early:\n{runs.stderr(process)[-3000:]}"
        finally:
            runs.kill(process)

        # Nothing of the run survives (a git command in its own session may
        # finish its work first; it must end by itself).
        left = []
        if not wait_until(lambda: not runs.ours(), timeout=15):
            left = runs.ours()
            for survivor in left:
                survivor.kill()
        assert not left, "survivors of a killed start:\n" + describe(left)

        log = runs.log(process)
        assert "Traceback" not in runs.stderr(process)

        # The checkpoint: present and valid once written, never going back.
        path = runs.checkpoint_path()
        corrupt = list(path.parent.glob("checkpoint.json.corrupt-*"))
        assert not corrupt, f"a checkpoint was found corrupt: {corrupt}"
        if path.exists():
            checkpoint = read_valid_checkpoint(path)
            written = True
        else:
            assert not written, f"checkpoint.json vanished after kill {round_number + 1}"
            checkpoint = None

        # The restart resumed from the checkpoint the previous kill left.
        if before >= 1:
            resumed = resumed_from(log)
            if resumed is not None:
                assert resumed == before, (resumed, before)
                resumes += 1
            first = first_iteration(log)
            if first is not None:
                assert first == before + 1, (first, before)

        if checkpoint is not None:
            assert checkpoint["iteration"] >= max(iterations, default=0)
            iterations.append(checkpoint["iteration"])

        # Where the kill landed, for the figures.
        subject = runs.git("log", "-1", "--format=%s").stdout
        committed = int(subject.split()[4]) if subject.startswith("ralph: checkpoint") else 0
        if first_iteration(log) is None:
            phases["start-up"] += 1
        elif checkpoint is not None and committed > checkpoint["iteration"]:
            phases["commit-then-checkpoint"] += 1
        else:
            phases["iteration"] += 1

        # History only grows.
        head = runs.head()
        assert runs.descends(heads[-1], head), f"HEAD {head} does not descend from {heads[-1]}"
        if checkpoint is not None and checkpoint.get("commit"):
            assert runs.descends(checkpoint["commit"], head)
        heads.append(head)

    # A last run, to a limit: the checkpoint and the repository still work.
    last = runs.iteration()
    final = runs.start("--checkpoint-interval", "1", "--max-iterations", str(last + 3))
    try:
        code = final.wait(timeout=120)
    finally:
        runs.kill(final)
    final_log = runs.log(final)
    assert code == 3, runs.stderr(final)[-3000:]
    assert resumed_from(final_log) == last
    assert runs.iteration() == last + 3
    head = runs.head()
    assert runs.descends(heads[-1], head) and runs.descends(users_commit, head)
    assert head != heads[-1], "the last run committed nothing: " + runs.stderr(final)[-2000:]
    fsck = runs.git("fsck", "--no-progress", check=False)
    stale_locks = [p.name for p in (runs.workdir / ".git").glob("*.lock")]

    commits = int(runs.git("rev-list", "--count", "HEAD").stdout)
    report(
        "crash_consistency",
        kills=kills,
        checkpoint_iterations=iterations,
        final_iteration=runs.iteration(),
        resumes_logged=resumes,
        commits=commits,
        distinct_heads=len(set(heads)),
        kill_delay_s_max=round(max(kill_delays), 2),
        kills_landed=dict(phases),
        corrupt=0,
        history_rewritten=0,
        git_fsck_ok=fsck.returncode == 0,
        stale_git_locks=stale_locks,
        seconds=round(time.monotonic() - started, 1),
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert iterations[-1] > iterations[0] or kills < 2


def loose_files(state_dir: Path) -> list[str]:
    loose = []
    for path in [state_dir, *sorted(state_dir.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        # .gitignore holds "*" and nothing else: readable on purpose.
        if mode & 0o077 and path.name != ".gitignore":
            loose.append(f"{path.relative_to(state_dir.parent)} {oct(mode)}")
    return loose


class StateFileModeDefect(AssertionError):
    """The known defect this test documents; any other failure fails it."""


@pytest.mark.parametrize("size", sizes(1, 1, bounded_timeout=90, full_timeout=90))
def test_start_state_files_are_private(tmp_path: Path, size: int, report) -> None:
    runs = StartRuns(tmp_path)
    make_repository(runs, items=50)
    state_dir = runs.workdir / ".ralph"
    process = runs.start("--checkpoint-interval", "1", QCHAT_SIM_LATENCY="0.3")
    try:
        assert wait_until(
            lambda: runs.iteration() >= 2 and (state_dir / "ralph-supervisor.pid").exists(),
            timeout=60,
        ), runs.stderr(process)[-3000:]
        listening = [
            f"{c.laddr.ip}:{c.laddr.port}"
            for c in psutil.Process(process.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        modes = {
            str(p.relative_to(state_dir)): oct(stat.S_IMODE(p.lstat().st_mode))
            for p in sorted(state_dir.rglob("*"))
            if p.suffix in (".json", ".pid", ".log")
        }
        loose = loose_files(state_dir)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    finally:
        runs.kill(process)

    report("start_files", listening=listening, modes=modes, group_or_other_access=loose)
    assert code == 0, runs.stderr(process)[-3000:]
    assert listening and all(address.startswith("127.0.0.1:") for address in listening)
    assert any(name.endswith(".log") for name in modes), modes
    assert "checkpoint.json" in modes and "ralph-supervisor.pid" in modes
    if loose:
        raise StateFileModeDefect(f"group or others may read: {loose}")
