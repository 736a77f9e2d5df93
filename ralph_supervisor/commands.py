"""The service commands: start, status, stop, ask and report.

Each is add_<name>_parser(subparsers), which adds the parser and sets its
handler; a handler takes the parsed arguments and returns the exit code.
cli.py lists them in its COMMANDS.

start   run the loop in the foreground (service.py)
          0 the task is complete, or stopped by SIGTERM/SIGINT after a drain
          1 failed: failures in a row, the breaker open too long, a bad prompt
          2 bad usage or configuration, or already running
          3 a limit: --max-iterations or --max-runtime
          4 no progress: stalled or repeating
status  0 running, 1 not running
stop    0 stopped, 1 was not running, 3 still running after --timeout
report  0 a report, 1 no loop has run there or --plot cannot be drawn
        (report.py)

ask     one prompt through the cached, guarded adapter; the answer on stdout.
        Its exit codes follow sysexits.h where one fits:

          0   the answer is on stdout
          1   the agent failed: bad exit, killed, output or memory limit
          2   bad usage or configuration
          64  the prompt was rejected (empty, too long, blocked)  EX_USAGE
          69  the circuit breaker is open, or the service is unwell
                                                           EX_UNAVAILABLE
          70  an internal error of ralph-supervisor           EX_SOFTWARE
          75  throttled, or timed out: try again later        EX_TEMPFAIL
          77  not logged in, or the login expired             EX_NOPERM
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ralph_supervisor.checkpoint import CheckpointCorrupt, CheckpointStore
from ralph_supervisor.config import AGENT_NAMES
from ralph_supervisor.errors import (
    CircuitOpen,
    ConfigError,
    PromptRejected,
    QChatAuthError,
    QChatError,
    QChatServiceError,
    QChatThrottled,
    QChatTimeout,
    QueueFull,
)

Subparsers = Any

HEALTH_QUERY_TIMEOUT = 2.0
DEFAULT_STOP_TIMEOUT = 60.0

# ask's exit codes, by error type (the most specific class first).
ASK_EXIT_OK = 0
ASK_EXIT_FAILED = 1
ASK_EXIT_USAGE = 2
ASK_EXIT_REJECTED = 64
ASK_EXIT_UNAVAILABLE = 69
ASK_EXIT_INTERNAL = 70
ASK_EXIT_TEMPFAIL = 75
ASK_EXIT_AUTH = 77

ASK_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, ASK_EXIT_USAGE),
    (PromptRejected, ASK_EXIT_REJECTED),
    (CircuitOpen, ASK_EXIT_UNAVAILABLE),
    (QChatServiceError, ASK_EXIT_UNAVAILABLE),
    (QChatThrottled, ASK_EXIT_TEMPFAIL),
    (QChatTimeout, ASK_EXIT_TEMPFAIL),
    (QueueFull, ASK_EXIT_TEMPFAIL),
    (QChatAuthError, ASK_EXIT_AUTH),
    (QChatError, ASK_EXIT_FAILED),
)

ASK_EPILOG = """\
exit codes:
  0   the answer is on stdout
  1   the agent failed: a bad exit status, killed, output or memory limit
  2   bad usage or configuration
  64  the prompt was rejected: empty, too long, or blocked (EX_USAGE)
  69  the circuit breaker is open, or the service is unwell (EX_UNAVAILABLE)
  70  an internal error of ralph-supervisor (EX_SOFTWARE)
  75  throttled, or timed out: try again later (EX_TEMPFAIL)
  77  not logged in, or the login expired: run `q login` (EX_NOPERM)
"""

START_EPILOG = """\
exit codes:
  0  the task is complete, or it was stopped by SIGTERM/SIGINT (after a drain)
  1  failed: failures in a row, the breaker open too long, or a bad prompt
  2  bad usage or configuration, or already running
  3  a limit was reached: --max-iterations or --max-runtime
  4  no progress: answers that change nothing in the work tree
     (loop.max_idle_iterations) or the same answer again and again
     (loop.max_repeats)
  With several tasks, the worst code wins (2 > 1 > 4 > 3 > 0).

A task is done when an answer holds loop.completion_promise (LOOP_COMPLETE),
or when the prompt file holds a line `- [x] TASK_COMPLETE`. Progress is kept
in STATE_DIR/checkpoint.json; a later start resumes it (--fresh starts over).
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown, and the epilog's table kept as written."""


def _default(key: str) -> Any:
    from ralph_supervisor.config import SETTINGS

    return SETTINGS[key].default


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(
            f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {text!r}"
        )
    return level


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    from ralph_supervisor.cli import add_config_option

    add_config_option(parser)


def _add_workdir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="the task's working directory (default: the current directory)",
    )


# ---------------------------------------------------------------------------
# start


def add_start_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "start",
        help="run the Ralph loop in the foreground until the task is done",
        description=(
            "Run the Ralph loop in the foreground: feed the prompt file to the agent\n"
            "again and again, in supervised workers, until the task is done or a limit\n"
            "is reached. Flags override the configuration file and the environment."
        ),
        epilog=START_EPILOG,
        formatter_class=_Formatter,
    )
    suppress = argparse.SUPPRESS
    _add_config_option(parser)
    parser.add_argument(
        "--agent",
        choices=AGENT_NAMES,
        default=suppress,
        help=f"the agent CLI; sim is the built-in simulator "
        f"(default: adapter.name, {_default('adapter.name')})",
    )
    _add_workdir_option(parser)
    parser.add_argument(
        "--prompt-file",
        metavar="FILE",
        default=suppress,
        help=f"the task prompt, relative to the workdir, re-read every iteration "
        f"(default: loop.prompt_file, {_default('loop.prompt_file')})",
    )
    parser.add_argument(
        "--max-iterations",
        metavar="N",
        type=_positive_int,
        default=suppress,
        help=f"stop after N iterations in all, resumed runs included "
        f"(default: loop.max_iterations, {_default('loop.max_iterations')})",
    )
    parser.add_argument(
        "--max-runtime",
        metavar="SECONDS",
        type=_positive_float,
        default=suppress,
        help=f"stop after this much running time in all; it cuts a call in flight "
        f"(default: loop.max_runtime, {_default('loop.max_runtime'):g})",
    )
    parser.add_argument(
        "--checkpoint-interval",
        metavar="N",
        type=_positive_int,
        default=suppress,
        help=f"write a checkpoint (and commit) every N iterations "
        f"(default: loop.checkpoint_interval, {_default('loop.checkpoint_interval')})",
    )
    parser.add_argument(
        "--metrics-interval",
        metavar="N",
        type=_positive_int,
        default=suppress,
        help=f"log a metrics summary every N iterations "
        f"(default: monitoring.metrics_interval, {_default('monitoring.metrics_interval')})",
    )
    parser.add_argument(
        "--log-file",
        metavar="FILE",
        default=suppress,
        help="write the log to FILE, rotated by size, creating its directory "
        "(default: logging.file; none: stderr)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=_log_level,
        default=suppress,
        help=f"DEBUG, INFO, WARNING, ERROR or CRITICAL "
        f"(default: logging.level, {_default('logging.level')})",
    )
    parser.add_argument("--verbose", action="store_true", help="log more detail (logging.verbose)")
    parser.add_argument(
        "--debug", action="store_true", help="log everything, prompts too (logging.debug)"
    )
    parser.add_argument(
        "--health-port",
        metavar="PORT",
        type=_port,
        default=suppress,
        help=f"the health and metrics port; 0 picks a free one "
        f"(default: monitoring.health_check_port, {_default('monitoring.health_check_port')})",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: move the old checkpoint and iteration logs aside",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print what would run, and exit without starting",
    )
    parser.set_defaults(handler=run_start_command)


def run_start_command(args: argparse.Namespace) -> int:
    from ralph_supervisor.service import StartOptions, run_start

    options = StartOptions(
        config=getattr(args, "config", None),
        agent=getattr(args, "agent", None),
        workdir=getattr(args, "workdir", None),
        prompt_file=getattr(args, "prompt_file", None),
        max_iterations=getattr(args, "max_iterations", None),
        max_runtime=getattr(args, "max_runtime", None),
        checkpoint_interval=getattr(args, "checkpoint_interval", None),
        metrics_interval=getattr(args, "metrics_interval", None),
        log_file=getattr(args, "log_file", None),
        log_level=getattr(args, "log_level", None),
        verbose=bool(getattr(args, "verbose", False)),
        debug=bool(getattr(args, "debug", False)),
        health_port=getattr(args, "health_port", None),
        fresh=bool(getattr(args, "fresh", False)),
        dry_run=bool(getattr(args, "dry_run", False)),
    )
    return run_start(options)


# ---------------------------------------------------------------------------
# status and stop: what `start` left in its state directory


def _locate(args: argparse.Namespace) -> tuple[Any, Path, Path]:
    """(config, workdir, main state dir) as `start` in that workdir would use."""
    from ralph_supervisor.config import load_config

    config = load_config(getattr(args, "config", None))
    raw = getattr(args, "workdir", None) or os.getcwd()
    workdir = Path(os.path.abspath(os.path.expanduser(raw)))
    return config, workdir, config.state_dir_for(workdir)


def _running_pid(state_dir: Path) -> int | None:
    from ralph_supervisor.service import PIDFILE_NAME, is_ralph_process, read_pid

    pid = read_pid(state_dir / PIDFILE_NAME)
    if pid is not None and is_ralph_process(pid):
        return pid
    return None


def _task_dirs(config: Any, workdir: Path, state_dir: Path) -> list[dict[str, str]]:
    """Each task's name and state directory, as `start` would place them."""
    from ralph_supervisor.service import locate_tasks

    return [
        {"name": task.name, "state_dir": str(task.state_dir)}
        for task in locate_tasks(config, workdir, state_dir)
    ]


def _query_health(url: str, path: str = "/health") -> dict[str, Any]:
    """GET a health route within HEALTH_QUERY_TIMEOUT; a 503 still has a body."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=HEALTH_QUERY_TIMEOUT) as reply:
            body = json.loads(reply.read().decode("utf-8"))
            status = reply.status
    except urllib.error.HTTPError as error:
        status = error.code
        try:
            body = json.loads(error.read().decode("utf-8"))
        except ValueError:
            body = {}
    except (OSError, ValueError) as error:
        return {"http_status": None, "status": "unreachable", "error": str(error)}
    if not isinstance(body, dict):
        body = {}
    return {"http_status": status, **body}


def add_status_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "status",
        help="say whether start is running here, and how far its task has got",
        description=(
            "Say whether `start` is running for a working directory: its pid, its\n"
            "health, and each task's iteration and last outcome (from the pidfile,\n"
            "health.json and the checkpoints). Exit 0 when running, 1 when not."
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(parser)
    _add_workdir_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run_status)


def run_status(args: argparse.Namespace) -> int:
    from ralph_supervisor.service import read_health_file

    config, workdir, state_dir = _locate(args)
    pid = _running_pid(state_dir)

    record = read_health_file(state_dir) if pid is not None else None
    if record is not None and record.get("pid") != pid:
        record = None  # left by an earlier run
    url = record.get("url") if record else None
    tasks = record.get("tasks") if record else None
    if not isinstance(tasks, list) or not tasks:
        tasks = _task_dirs(config, workdir, state_dir)

    health = live = None
    if pid is not None and url:
        health = _query_health(url)
        # The checkpoint lags by up to checkpoint_interval iterations; the
        # running process knows where each loop is now.
        detailed = _query_health(url, "/health/detailed")
        live = detailed.get("loop") if isinstance(detailed.get("loop"), dict) else None

    report: dict[str, Any] = {
        "running": pid is not None,
        "pid": pid,
        "workdir": str(workdir),
        "state_dir": str(state_dir),
        "health_url": url,
        "health": health,
        "tasks": [_task_status(task, live) for task in tasks],
    }

    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_status(report)
    return 0 if pid is not None else 1


def _task_status(task: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    name = str(task.get("name"))
    store = CheckpointStore(Path(str(task.get("state_dir"))))
    entry: dict[str, Any] = {"name": name, "state_dir": str(store.state_dir)}
    progress = live.get(name) if live else None
    if isinstance(progress, dict):
        entry["live"] = {
            key: progress.get(key)
            for key in ("iteration", "max_iterations", "status", "last_outcome", "runtime_s")
        }
    try:
        checkpoint = store.peek()
    except CheckpointCorrupt as error:
        return entry | {"checkpoint": None, "error": f"unreadable checkpoint: {error}"}
    if checkpoint is None:
        return entry | {"checkpoint": None}
    return entry | {
        "checkpoint": str(store.path),
        "iteration": checkpoint.iteration,
        "status": checkpoint.status,
        "last_outcome": checkpoint.last_outcome,
        "stop_reason": checkpoint.stop_reason,
        "updated_at": checkpoint.updated_at,
        "successes": checkpoint.successes,
        "failures": checkpoint.failures,
    }


def _print_status(report: dict[str, Any]) -> None:
    if report["running"]:
        print(f"ralph-supervisor is running (pid {report['pid']}) in {report['workdir']}")
    else:
        print(f"ralph-supervisor is not running in {report['workdir']}")

    health = report["health"]
    if report["health_url"]:
        state = health.get("status", "?") if health else "?"
        reasons = "; ".join(health.get("reasons") or []) if health else ""
        print(
            f"  health: {report['health_url']}/health: {state}"
            + (f" ({reasons})" if reasons else "")
        )
    elif report["running"]:
        print("  health: no server (monitoring.health_check_enabled is off)")

    for task in report["tasks"]:
        live = task.get("live")
        if live:
            print(
                f"  task {task['name']}: iteration {live['iteration']} of "
                f"{live['max_iterations']}, {live['status']}, last outcome "
                f"{live['last_outcome'] or '-'} ({live['runtime_s']} s run)"
            )
        elif task.get("error"):
            print(f"  task {task['name']}: {task['error']}")
        elif task.get("checkpoint") is None:
            print(f"  task {task['name']}: no checkpoint yet in {task['state_dir']}")
        else:
            reason = f", {task['stop_reason']}" if task.get("stop_reason") else ""
            print(
                f"  task {task['name']}: iteration {task['iteration']}, {task['status']}"
                f"{reason}, last outcome {task['last_outcome'] or '-'} "
                f"(checkpoint of {task['updated_at']})"
            )


def add_stop_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "stop",
        help="stop a running start: SIGTERM, then wait for its drain",
        description=(
            "Send SIGTERM to the `start` running for a working directory (after\n"
            "checking that the pidfile's pid is a ralph-supervisor), then wait for it\n"
            "to drain and exit. Exit 0 when it stopped, 1 when it was not running,\n"
            "3 when it still runs after --timeout."
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(parser)
    _add_workdir_option(parser)
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_float,
        default=DEFAULT_STOP_TIMEOUT,
        help="seconds to wait for it to exit",
    )
    parser.set_defaults(handler=run_stop)


def run_stop(args: argparse.Namespace) -> int:
    from ralph_supervisor.service import PIDFILE_NAME, read_pid

    _, workdir, state_dir = _locate(args)
    pidfile = state_dir / PIDFILE_NAME
    named = read_pid(pidfile)
    pid = _running_pid(state_dir)
    if pid is None:
        if named is not None:
            print(
                f"ralph-supervisor is not running in {workdir} (the pidfile {pidfile} names "
                f"pid {named}, which is not a live ralph-supervisor)",
                file=sys.stderr,
            )
        else:
            print(f"ralph-supervisor is not running in {workdir}", file=sys.stderr)
        return 1

    try:
        stopper = _Stopper(pid)
    except ProcessLookupError:
        print(f"ralph-supervisor (pid {pid}) exited before the signal", file=sys.stderr)
        return 0
    with stopper:
        stopper.terminate()
        print(f"sent SIGTERM to ralph-supervisor (pid {pid}); waiting up to {args.timeout:g} s")
        if not stopper.wait(args.timeout):
            print(
                f"ralph-supervisor (pid {pid}) is still running after {args.timeout:g} s: it "
                "drains the calls in flight for up to supervisor.drain_timeout. Run stop "
                f"again to stop it at once, or kill -KILL {pid} as a last resort.",
                file=sys.stderr,
            )
            return 3
    print(f"ralph-supervisor (pid {pid}) stopped")
    return 0


class _Stopper:
    """Signal one process and wait for its end, though it is not our child.

    A pidfd names the process itself, not its number: the signal cannot
    reach a stranger that reused the pid, and the pidfd becomes readable
    the moment the process exits, zombie or not (its parent reaps it, not
    us). Without pidfds (not Linux), psutil, and a zombie counts as gone.
    """

    def __init__(self, pid: int) -> None:
        import psutil

        self.pid = pid
        self.fd: int | None = None
        try:
            self.fd = os.pidfd_open(pid)
        except (AttributeError, OSError) as error:
            if isinstance(error, ProcessLookupError):
                raise
        self.process = psutil.Process(pid)

    def __enter__(self) -> _Stopper:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def terminate(self) -> None:
        import psutil

        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass

    def wait(self, timeout: float) -> bool:
        """Whether the process ended within timeout."""
        import select
        import time

        import psutil

        if self.fd is not None:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            return bool(ready)

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.process.status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


# ---------------------------------------------------------------------------
# ask


def add_ask_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "ask",
        help="send one prompt through the cached, guarded adapter; print the answer",
        description=(
            "Send one prompt to the agent through the cached, guarded adapter\n"
            "(validation, breaker, rate limit, retries, cache) and print its answer\n"
            "on stdout. PROMPT `-` reads the prompt from stdin."
        ),
        epilog=ASK_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt, or - to read stdin")
    _add_config_option(parser)
    parser.add_argument(
        "--agent",
        choices=AGENT_NAMES,
        default=argparse.SUPPRESS,
        help=f"the agent CLI (default: adapter.name, {_default('adapter.name')})",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_float,
        default=argparse.SUPPRESS,
        help=f"seconds for the call, retries included "
        f"(default: adapter.timeout, {_default('adapter.timeout'):g})",
    )
    parser.add_argument(
        "--cwd",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="the agent's working directory (default: the current directory)",
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor store the cache")
    parser.set_defaults(handler=run_ask)


def ask_exit_code(error: BaseException) -> int:
    """The exit code of `ask` for an error (see ASK_EPILOG)."""
    for kind, code in ASK_EXIT_CODES:
        if isinstance(error, kind):
            return code
    return ASK_EXIT_INTERNAL


def run_ask(args: argparse.Namespace) -> int:
    from ralph_supervisor.config import load_config

    overrides: dict[str, Any] = {}
    if getattr(args, "agent", None):
        overrides["adapter.name"] = args.agent
    if args.no_cache:
        overrides["cache.enabled"] = False

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        config = load_config(getattr(args, "config", None), overrides=overrides)
        _setup_ask_logging(config)
        adapter = _build_adapter(config, cached=not args.no_cache)
        response = adapter.execute(
            prompt,
            cwd=os.path.abspath(getattr(args, "cwd", None) or os.getcwd()),
            timeout=getattr(args, "timeout", None),
        )
    except QChatError as error:
        code = ask_exit_code(error)
        print(f"ralph-supervisor ask: {error.kind}: {_one_line(str(error))}", file=sys.stderr)
        return code

    sys.stdout.write(response.text)
    return ASK_EXIT_OK


def _setup_ask_logging(config: Any) -> None:
    """Logs go where the configuration says; on a bare stderr, errors only.

    ask reports its own failure in one line. The warnings behind it (a
    retry, the breaker opening) would only repeat it, unless asked for.
    """
    import logging

    settings = config.logging
    if settings.file or settings.verbose or settings.debug:
        from ralph_supervisor.logs import setup_logging

        setup_logging(settings)
        return
    logging.getLogger("ralph_supervisor").setLevel(logging.ERROR)


def _build_adapter(config: Any, *, cached: bool) -> Any:
    from ralph_supervisor.adapter import CachedAdapter, QChatAdapter

    # The library's state directory (state.dir, or ~/.local/state/...):
    # a repeated ask is answered from the cache there.
    adapter = QChatAdapter(config)
    return CachedAdapter(adapter) if cached else adapter


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------
# report


def add_report_parser(subparsers: Subparsers) -> None:
    from ralph_supervisor.report import add_report_parser as add_parser

    add_parser(subparsers)


# (name, add_<name>_parser), for cli.COMMANDS.
COMMANDS: tuple[tuple[str, Callable[[Subparsers], None]], ...] = (
    ("start", add_start_parser),
    ("status", add_status_parser),
    ("stop", add_stop_parser),
    ("ask", add_ask_parser),
    ("report", add_report_parser),
)
