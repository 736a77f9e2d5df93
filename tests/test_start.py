"""`ralph-supervisor start`, status, stop and ask, as real processes.

Every test runs the CLI as `python -m ralph_supervisor ...` in its own
session, with the simulator as the agent, a temporary workdir, --health-port 0
and bounded waits; the runner fixture kills whatever a test leaves behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until

CLI = [sys.executable, "-m", "ralph_supervisor"]

BASE_CONFIG = """\
performance:
  max_concurrent: 2
adapter:
  max_retries: 0
  retry_delay: 0.05
  kill_grace: 0.5
breaker:
  storage: memory
supervisor:
  drain_timeout: 10
  hang_grace: 2
"""

# The deployment guide's file as users have it, down to the blank lines that
# hold two spaces.
GUIDE_CONFIG = "\n".join(
    [
        "# config/qchat.yaml",
        "adapter:",
        "  name: qchat",
        "  timeout: 300",
        "  max_retries: 5",
        "  retry_delay: 2",
        "  ",
        "performance:",
        "  buffer_size: 8192",
        "  poll_interval: 0.1",
        "  max_concurrent: 10",
        "  ",
        "logging:",
        "  level: INFO",
        '  format: "%(asctime)s - %(name)s - %(levelname)s - %(message)s"',
        "  file: /var/log/ralph/qchat.log",
        "  ",
        "monitoring:",
        "  metrics_enabled: true",
        "  metrics_interval: 60",
        "  health_check_port: 8080",
        "",
    ]
)


def checklist(items: int, extra: str = "") -> str:
    return extra + "".join(f"- [ ] step {n}\n" for n in range(1, items + 1))


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines of stderr."""
        lines = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines


class Runner:
    """Starts CLI processes in their own sessions and always cleans them up."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen[bytes]] = []
        home = tmp_path / "home"
        home.mkdir()
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("QCHAT_", "HEALTH_CHECK", "NOTIFY_SOCKET", "WATCHDOG_"))
        }
        # A git with no identity and no user configuration: the fallback is
        # exercised, and the tester's settings cannot leak in.
        self.env.update(
            HOME=str(home),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_CONFIG_GLOBAL=str(home / "gitconfig"),
            QCHAT_STATE_DIR="",
        )
        self.run_tag = uuid.uuid4().hex
        self.env["RALPH_TEST_RUN"] = self.run_tag

    def config(self, extra: str = "", name: str = "ralph.yaml") -> Path:
        path = self.tmp_path / name
        path.write_text(BASE_CONFIG + extra)
        return path

    def workdir(self, name: str = "work", prompt: str | None = None) -> Path:
        path = self.tmp_path / name
        path.mkdir(parents=True, exist_ok=True)
        if prompt is not None:
            (path / "PROMPT.md").write_text(prompt)
        return path

    def spawn(
        self,
        args: list[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> tuple[subprocess.Popen[bytes], Path, Path]:
        out = self.tmp_path / f"out-{uuid.uuid4().hex[:8]}"
        err = out.with_suffix(".err")
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(
                [*CLI, *args],
                cwd=cwd or self.tmp_path,
                env=self.env | (env or {}),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        if stdin is not None:
            assert process.stdin is not None
            process.stdin.write(stdin)
            process.stdin.close()
        self.processes.append(process)
        return process, out, err

    def start(self, workdir: Path, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        base = ["start", "--agent", "sim", "--workdir", str(workdir), "--health-port", "0"]
        process, out, err = self.spawn([*base, *args], **kwargs)
        process.out_path = out  # type: ignore[attr-defined]
        process.err_path = err  # type: ignore[attr-defined]
        return process

    def finish(self, process: subprocess.Popen[bytes], timeout: float = 30) -> Finished:
        started = time.monotonic()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(process)
            stderr = Path(process.err_path).read_text()  # type: ignore[attr-defined]
            pytest.fail(f"{process.args} did not finish within {timeout} s:\n{stderr[-3000:]}")
        return Finished(
            process.returncode,
            Path(process.out_path).read_text(),  # type: ignore[attr-defined]
            Path(process.err_path).read_text(),  # type: ignore[attr-defined]
            time.monotonic() - started,
        )

    def run(self, *args: str, timeout: float = 30, **kwargs: Any) -> Finished:
        """Any CLI command, to its end."""
        process, out, err = self.spawn(list(args), **kwargs)
        process.out_path = out  # type: ignore[attr-defined]
        process.err_path = err  # type: ignore[attr-defined]
        return self.finish(process, timeout)

    def run_start(self, workdir: Path, *args: str, timeout: float = 30, **kw: Any) -> Finished:
        return self.finish(self.start(workdir, *args, **kw), timeout)

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(10)

    def close(self) -> None:
        for process in self.processes:
            self.kill(process)
        # A start killed by SIGKILL leaves its workers to die on their own.
        wait_until(lambda: not self.tagged(), timeout=5)

    def tagged(self, needle: str = "") -> list[psutil.Process]:
        """Live processes started by this test (and the agents of its runs)."""
        found = []
        for process in psutil.process_iter(["pid"]):
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                if process.environ().get("RALPH_TEST_RUN") != self.run_tag:
                    continue
                if needle and needle not in " ".join(process.cmdline()):
                    continue
            except psutil.Error:
                continue
            found.append(process)
        return found


def read_checkpoint(workdir: Path, state: str = ".ralph") -> dict[str, Any]:
    return json.loads((workdir / state / "checkpoint.json").read_text())


def single_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.strip()


# -- the loop's ends --------------------------------------------------------------


def test_start_completes_a_checklist_and_logs_each_iteration(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(3))
    log_file = runner.tmp_path / "logs" / "nested" / "ralph.log"

    done = runner.run_start(
        workdir,
        "--config",
        str(runner.config()),
        "--metrics-interval",
        "2",
        "--log-file",
        str(log_file),
    )

    assert done.returncode == 0, done.stderr
    checkpoint = read_checkpoint(workdir)
    assert checkpoint["status"] == "complete"
    assert checkpoint["iteration"] == 3
    assert checkpoint["stop_reason"] == "completion_promise"
    assert checkpoint["successes"] == 3 and checkpoint["failures"] == {}
    for key in ("started_at", "updated_at", "attempts", "task"):
        assert key in checkpoint
    logs = sorted(p.name for p in (workdir / ".ralph" / "iterations").iterdir())
    assert logs == ["0001.log", "0002.log", "0003.log"]
    assert "----- stderr -----" in (workdir / ".ralph" / "iterations" / "0002.log").read_text()
    assert "- [ ]" not in (workdir / "PROMPT.md").read_text()

    # The log went to the file, in a directory created for it; the terminal
    # got the one closing line.
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    iterations = [r for r in records if r.get("outcome")]
    assert [r["iteration"] for r in iterations] == [1, 2, 3]
    assert all({"duration_s", "attempts", "task"} <= set(r) for r in iterations)
    summaries = [r for r in records if "summary after" in r["message"]]
    assert len(summaries) == 1 and "p50_s" in summaries[0]
    assert "complete after iteration 3" in done.stderr
    assert not (workdir / ".ralph" / "ralph-supervisor.pid").exists()
    assert not (workdir / ".ralph" / "health.json").exists()

    # Complete: a second start says so and starts nothing.
    again = runner.run_start(workdir, "--config", str(runner.config()))
    assert again.returncode == 0
    assert "already complete" in again.stderr

    # --fresh starts over, keeping the old checkpoint aside.
    fresh = runner.run_start(workdir, "--config", str(runner.config()), "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert read_checkpoint(workdir)["iteration"] == 1
    assert len(list((workdir / ".ralph").glob("checkpoint.json.fresh-*"))) == 1


def test_max_iterations_exits_3_and_counts_the_total_on_resume(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(8))
    config = str(runner.config())

    first = runner.run_start(workdir, "--config", config, "--max-iterations", "2")
    assert first.returncode == 3, first.stderr
    checkpoint = read_checkpoint(workdir)
    assert (checkpoint["status"], checkpoint["stop_reason"], checkpoint["iteration"]) == (
        "stopped",
        "max_iterations",
        2,
    )

    second = runner.run_start(workdir, "--config", config, "--max-iterations", "4")
    assert second.returncode == 3, second.stderr
    checkpoint = read_checkpoint(workdir)
    assert (checkpoint["iteration"], checkpoint["runs"]) == (4, 2)
    logs = sorted(p.name for p in (workdir / ".ralph" / "iterations").iterdir())
    assert logs == ["0001.log", "0002.log", "0003.log", "0004.log"]


def test_max_runtime_cuts_a_slow_iteration_and_exits_3(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(2))
    done = runner.run_start(
        workdir,
        "--config",
        str(runner.config()),
        "--max-runtime",
        "1.5",
        env={"QCHAT_SIM_LATENCY": "30"},
    )

    assert done.returncode == 3, done.stderr
    assert done.elapsed < 15  # far below the 30 s the agent would take
    checkpoint = read_checkpoint(workdir)
    assert (checkpoint["status"], checkpoint["stop_reason"]) == ("stopped", "max_runtime")
    first = (workdir / ".ralph" / "iterations" / "0001.log").read_text()
    assert first.startswith("error: timeout:")


def test_consecutive_failures_exit_1_with_the_reason(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(9))
    config = runner.config()
    config.write_text(
        BASE_CONFIG.replace("breaker:\n  storage: memory\n", "breaker:\n  enabled: false\n")
        + "loop:\n  max_consecutive_failures: 3\n"
    )
    done = runner.run_start(workdir, "--config", str(config), env={"QCHAT_SIM_EXIT": "3"})

    assert done.returncode == 1, done.stderr
    assert "3 iterations failed in a row" in done.stderr
    checkpoint = read_checkpoint(workdir)
    assert (checkpoint["status"], checkpoint["stop_reason"]) == ("failed", "consecutive_failures")
    assert checkpoint["failures"] == {"process_error": 3}
    assert "error: process_error" in (workdir / ".ralph" / "iterations" / "0003.log").read_text()


# -- checkpoints and git ------------------------------------------------------------


def test_checkpoints_commit_the_work_tree_and_only_add_history(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(4))
    git(workdir, "init", "-q", "-b", "main")
    (workdir / "notes.txt").write_text("the user's notes\n")
    git(workdir, "add", "-A")
    git(
        workdir, "-c", "user.name=Ada", "-c", "user.email=ada@example.com", "commit", "-qm", "mine"
    )
    users_commit = git(workdir, "rev-parse", "HEAD")

    done = runner.run_start(
        workdir,
        "--config",
        str(runner.config()),
        "--checkpoint-interval",
        "2",
        env={"QCHAT_SIM_WORK_DIR": "work"},
    )

    assert done.returncode == 0, done.stderr
    subjects = git(workdir, "log", "--format=%s").splitlines()
    assert subjects == [
        "ralph: checkpoint after iteration 4 (work)",
        "ralph: checkpoint after iteration 2 (work)",
        "mine",
    ]
    subprocess.run(
        ["git", "merge-base", "--is-ancestor", users_commit, "HEAD"],
        cwd=workdir,
        check=True,
        timeout=30,
    )
    tracked = git(workdir, "ls-files").splitlines()
    assert not [path for path in tracked if path.startswith(".ralph")]
    assert "work/item-4.txt" in tracked and "PROMPT.md" in tracked
    assert git(workdir, "status", "--porcelain") == ""
    assert read_checkpoint(workdir)["commit"] == git(workdir, "rev-parse", "HEAD")


def test_sigkill_leaves_nothing_behind_and_a_restart_resumes(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(10))
    config = str(runner.config())
    process = runner.start(
        workdir,
        "--config",
        config,
        "--checkpoint-interval",
        "2",
        env={"QCHAT_SIM_LATENCY": "0.2"},
    )

    def checkpointed_and_mid_call() -> bool:
        try:
            at = read_checkpoint(workdir)["iteration"]
        except (OSError, ValueError):
            return False
        return at >= 2 and bool(runner.tagged("ralph_supervisor.simulator"))

    assert wait_until(checkpointed_and_mid_call, timeout=20), "no checkpoint in time"
    assert len(runner.tagged("ralph_supervisor.worker")) + len(runner.tagged()) > 2
    process.send_signal(signal.SIGKILL)
    process.wait(10)

    # Workers exit when their parent dies, and take their agents with them.
    assert wait_until(lambda: not runner.tagged(), timeout=5), [
        " ".join(p.cmdline()) for p in runner.tagged()
    ]
    resumed_from = read_checkpoint(workdir)["iteration"]

    done = runner.run_start(workdir, "--config", config, "--checkpoint-interval", "2")
    assert done.returncode == 0, done.stderr
    assert f"resuming after iteration {resumed_from}" in done.stderr
    assert "stale pidfile" in done.stderr
    checkpoint = read_checkpoint(workdir)
    assert checkpoint["status"] == "complete" and checkpoint["runs"] == 2
    assert checkpoint["iteration"] > resumed_from
    iterations = [r["iteration"] for r in done.log_lines() if r.get("outcome")]
    assert iterations[0] == resumed_from + 1
    assert iterations == list(range(resumed_from + 1, checkpoint["iteration"] + 1))
    assert "- [ ]" not in (workdir / "PROMPT.md").read_text()


@pytest.mark.parametrize(
    ("drain", "latency", "outcome"),
    [("10", "1.5", "success"), ("0.3", "30", "supervisor_closed")],
    ids=["drained", "drain-timeout"],
)
def test_sigterm_mid_iteration_drains_checkpoints_and_exits_0(
    runner: Runner, drain: str, latency: str, outcome: str
) -> None:
    workdir = runner.workdir(prompt=checklist(5))
    config = runner.config()
    config.write_text(BASE_CONFIG.replace("drain_timeout: 10", f"drain_timeout: {drain}"))
    process = runner.start(workdir, "--config", str(config), env={"QCHAT_SIM_LATENCY": latency})

    assert wait_until(lambda: runner.tagged("ralph_supervisor.simulator"), timeout=20)
    process.send_signal(signal.SIGTERM)
    done = runner.finish(process, timeout=15)

    assert done.returncode == 0, done.stderr
    assert done.elapsed < float(drain) + 8
    checkpoint = read_checkpoint(workdir)
    assert (checkpoint["status"], checkpoint["stop_reason"]) == ("stopped", "signal")
    assert (checkpoint["iteration"], checkpoint["last_outcome"]) == (1, outcome)


def test_sighup_reloads_the_configuration_and_keeps_the_flags(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(5))
    # The file names no agent: without the flags, a reload would fall back
    # to q, which is not installed here.
    process = runner.start(
        workdir, "--config", str(runner.config()), env={"QCHAT_SIM_LATENCY": "0.3"}
    )
    first = workdir / ".ralph" / "iterations" / "0001.log"
    assert wait_until(first.exists, timeout=20)
    process.send_signal(signal.SIGHUP)
    done = runner.finish(process)

    assert done.returncode == 0, done.stderr
    assert "configuration reloaded" in done.stderr
    checkpoint = read_checkpoint(workdir)
    assert (checkpoint["status"], checkpoint["failures"]) == ("complete", {})


# -- several tasks -------------------------------------------------------------------


def test_two_tasks_run_at_once_and_the_worst_exit_code_wins(runner: Runner) -> None:
    main = runner.workdir("main")
    runner.workdir("main/alpha", prompt=checklist(3, "@sim:latency=0.3\n"))
    runner.workdir("main/beta", prompt=checklist(3, "@sim:latency=0.3 @sim:exit=3\n"))
    config = runner.config()
    config.write_text(
        BASE_CONFIG.replace("breaker:\n  storage: memory\n", "breaker:\n  enabled: false\n")
        + "loop:\n  max_consecutive_failures: 2\n"
        + "tasks:\n  - workdir: alpha\n  - name: b\n    workdir: beta\n"
    )

    done = runner.run_start(main, "--config", str(config))

    assert done.returncode == 1, done.stderr
    alpha = read_checkpoint(main / "alpha")
    beta = read_checkpoint(main / "beta")
    assert (alpha["task"], alpha["status"], alpha["iteration"]) == ("alpha", "complete", 3)
    assert (beta["task"], beta["status"], beta["stop_reason"]) == (
        "b",
        "failed",
        "consecutive_failures",
    )
    # Both ran at the same time: b had failed before alpha was done.
    messages = [r["message"] for r in done.log_lines()]
    b_failed = next(i for i, m in enumerate(messages) if m.startswith("task b failed after"))
    alpha_done = next(i for i, m in enumerate(messages) if m.startswith("task alpha complete"))
    assert b_failed < alpha_done
    assert not (main / ".ralph" / "checkpoint.json").exists()


# -- usage, configuration, dry runs ----------------------------------------------------


@pytest.mark.parametrize(
    ("config_text", "args", "expected"),
    [
        ("performance:\n  max_concurrent: ten\n", [], "performance.max_concurrent"),
        ("loop:\n  max_iteration: 5\n", [], "did you mean 'loop.max_iterations'"),
        ("adapter: [1, 2\n", [], "invalid YAML"),
        (None, [], "no such file (write the task prompt there)"),
        ("", ["--workdir", "/nonexistent/ralph"], "no such directory"),
        ("", ["--prompt-file", "TASK.md"], "TASK.md: no such file"),
    ],
    ids=["bad-value", "unknown-key", "bad-yaml", "no-prompt", "no-workdir", "no-prompt-file"],
)
def test_bad_usage_exits_2_with_one_line(
    runner: Runner, config_text: str | None, args: list[str], expected: str
) -> None:
    workdir = runner.workdir(prompt=None if config_text is None else checklist(1))
    config = runner.config()
    config.write_text(config_text or "")
    done = runner.run(
        "start",
        "--agent",
        "sim",
        "--health-port",
        "0",
        "--config",
        str(config),
        *args,
        cwd=workdir,
    )

    assert done.returncode == 2
    line = single_line(done.stderr)
    assert line.startswith("ralph-supervisor")
    assert expected in line
    assert "Traceback" not in done.stderr
    assert not (workdir / ".ralph").exists()


def test_a_health_port_in_use_exits_2(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = runner.run(
            "start", "--agent", "sim", "--workdir", str(workdir), "--health-port", str(port)
        )
    assert done.returncode == 2
    last = done.stderr.splitlines()[-1]
    assert last.startswith("ralph-supervisor start: monitoring.health_check_port")
    assert "--health-port" in last and "Traceback" not in done.stderr
    assert not (workdir / ".ralph" / "ralph-supervisor.pid").exists()


def test_a_bad_flag_is_a_usage_error(runner: Runner) -> None:
    done = runner.run("start", "--agent", "sim", "--max-iterations", "0")
    assert done.returncode == 2
    assert "--max-iterations: expected a positive integer" in done.stderr
    assert "Traceback" not in done.stderr


def test_dry_run_checks_everything_and_starts_nothing(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(2))
    done = runner.run("start", "--agent", "sim", "--workdir", str(workdir), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "configuration is valid" in done.stdout
    assert str(workdir / "PROMPT.md") in done.stdout
    assert "ralph_supervisor.simulator" in done.stdout
    assert not (workdir / ".ralph").exists()


def test_the_deployment_guides_command_line_works(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(2))
    (workdir / "config").mkdir()
    (workdir / "config" / "qchat.yaml").write_text(GUIDE_CONFIG)
    log_file = runner.tmp_path / "var" / "log" / "ralph" / "orchestrator.log"
    guide_line = [
        "start",
        "--agent",
        "q",
        "--config",
        "config/qchat.yaml",
        "--checkpoint-interval",
        "10",
        "--max-iterations",
        "1000",
        "--metrics-interval",
        "60",
        "--log-file",
        str(log_file),
    ]
    no_q = {"PATH": str(runner.tmp_path / "empty-bin")}

    # q is not installed here: a dry run warns, a real start refuses.
    dry = runner.run(*guide_line, "--dry-run", cwd=workdir, env=no_q)
    assert dry.returncode == 0, dry.stderr
    assert "warning: the agent command 'q'" in dry.stdout
    refused = runner.run(*guide_line, "--health-port", "0", cwd=workdir, env=no_q)
    assert refused.returncode == 2
    assert "not on PATH" in single_line(refused.stderr)

    # The same line with the simulator runs, logging in the guide's format
    # to a file in a directory that did not exist.
    sim_line = [*guide_line[:2], "sim", *guide_line[3:], "--health-port", "0"]
    done = runner.run(*sim_line, cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert read_checkpoint(workdir)["status"] == "complete"
    assert " - ralph_supervisor.loop - INFO - task work: iteration 1 " in log_file.read_text()


def test_systemd_hears_ready_watchdog_and_stopping(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(3, "@sim:latency=0.3\n"))
    # A short path: AF_UNIX addresses are limited to about 108 bytes.
    directory = tempfile.mkdtemp(prefix="ralph-notify-")
    address = os.path.join(directory, "notify")
    messages: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(0.1)
        # Read while it runs: a unix datagram queue holds only about ten.
        finished = threading.Event()

        def receive() -> None:
            while True:
                try:
                    messages.append(sock.recv(4096).decode())
                except TimeoutError:
                    if finished.is_set():
                        return

        reader = threading.Thread(target=receive)
        reader.start()
        try:
            done = runner.run_start(
                workdir,
                "--config",
                str(runner.config()),
                env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
            )
        finally:
            finished.set()
            reader.join(10)
    os.unlink(address)
    os.rmdir(directory)

    assert done.returncode == 0, done.stderr
    kinds = [message.splitlines()[0] for message in messages]
    assert kinds[0] == "READY=1"
    assert "WATCHDOG=1" in kinds
    assert kinds[-1] == "STOPPING=1", messages


# -- status, stop, and a second start -----------------------------------------------------


def test_status_and_stop_against_a_running_start(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(60))
    config = str(runner.config())
    process = runner.start(workdir, "--config", config, env={"QCHAT_SIM_LATENCY": "0.2"})
    health_file = workdir / ".ralph" / "health.json"
    assert wait_until(health_file.exists, timeout=20)
    assert wait_until(lambda: (workdir / ".ralph" / "iterations").exists(), timeout=20)

    status = runner.run("status", "--workdir", str(workdir), "--config", config)
    assert status.returncode == 0, status.stderr
    assert f"running (pid {process.pid})" in status.stdout
    assert "/health: healthy" in status.stdout

    as_json = runner.run("status", "--workdir", str(workdir), "--config", config, "--json")
    report = json.loads(as_json.stdout)
    assert report["running"] and report["pid"] == process.pid
    assert report["health_url"] == json.loads(health_file.read_text())["url"]
    assert report["health"]["status"] == "healthy"
    assert report["tasks"][0]["live"]["max_iterations"] == 100

    second = runner.run_start(workdir, "--config", config)
    assert second.returncode == 2
    assert f"already running (pid {process.pid})" in second.stderr

    stop = runner.run("stop", "--workdir", str(workdir), "--config", config, "--timeout", "20")
    assert stop.returncode == 0, stop.stderr
    assert "stopped" in stop.stdout
    assert process.wait(5) == 0
    assert read_checkpoint(workdir)["status"] == "stopped"

    after = runner.run("status", "--workdir", str(workdir), "--config", config)
    assert after.returncode == 1
    assert "not running" in after.stdout
    assert "stopped, signal" in after.stdout
    again = runner.run("stop", "--workdir", str(workdir), "--config", config)
    assert again.returncode == 1
    assert "not running" in again.stderr


# -- ask ---------------------------------------------------------------------------------


def test_ask_prints_the_answer_and_maps_errors_to_exit_codes(runner: Runner) -> None:
    state = {"QCHAT_STATE_DIR": str(runner.tmp_path / "ask-state")}

    answer = runner.run("ask", "--agent", "sim", "hello there", env=state)
    assert answer.returncode == 0, answer.stderr
    assert 'You asked: "hello there"' in answer.stdout

    piped = runner.run("ask", "--agent", "sim", "-", env=state, stdin=b"from stdin")
    assert piped.returncode == 0
    assert 'You asked: "from stdin"' in piped.stdout

    rejected = runner.run("ask", "--agent", "sim", "   ", env=state)
    assert rejected.returncode == 64
    assert "prompt_rejected" in single_line(rejected.stderr)

    auth = runner.run("ask", "--agent", "sim", "q", env=state | {"QCHAT_SIM_FAILURE": "auth"})
    assert auth.returncode == 77
    assert "auth_error" in single_line(auth.stderr)

    # An expired login opens the breaker at once: the next ask is refused.
    refused = runner.run("ask", "--agent", "sim", "--no-cache", "again", env=state)
    assert refused.returncode == 69
    assert "circuit_open" in single_line(refused.stderr)

    state = {"QCHAT_STATE_DIR": str(runner.tmp_path / "ask-state-2")}
    throttled = runner.run(
        "ask",
        "--agent",
        "sim",
        "--no-cache",
        "q",
        env=state | {"QCHAT_SIM_FAILURE": "throttled", "QCHAT_MAX_RETRIES": "0"},
    )
    assert throttled.returncode == 75

    slow = runner.run(
        "ask", "--agent", "sim", "--timeout", "0.5", "slow", env=state | {"QCHAT_SIM_LATENCY": "5"}
    )
    assert slow.returncode == 75
    assert "timeout" in single_line(slow.stderr)


def test_help_lists_every_option_with_its_default(runner: Runner) -> None:
    start = runner.run("start", "--help")
    assert start.returncode == 0
    for text in (
        "--max-iterations N",
        "(default: loop.max_iterations, 100)",
        "(default: loop.max_runtime, 14400)",
        "(default: loop.checkpoint_interval, 5)",
        "(default: monitoring.health_check_port, 8080)",
        "--dry-run",
        "exit codes:",
    ):
        assert text in start.stdout

    ask = runner.run("ask", "--help")
    for code in ("64", "69", "70", "75", "77"):
        assert f"\n  {code}  " in ask.stdout

    stop = runner.run("stop", "--help")
    assert "(default: 60.0)" in stop.stdout
    status = runner.run("status", "--help")
    assert "--workdir DIR" in status.stdout
