"""`ralph-supervisor start`: the long-running service, from flags to exit code.

    run_start(options)
      plan      config (defaults < file < environment < flags), workdir,
                tasks, the agent's command on PATH         -> exit 2 if bad
      --dry-run print the plan, exit 0 (nothing is started or written)
      logging   stderr, or --log-file (its directory created when possible)
      pidfile   STATE_DIR/ralph-supervisor.pid, held with flock for our life
      tasks     each loop loads its checkpoint: resume, --fresh, or done
      health    /health, /health/detailed, /metrics; STATE_DIR/health.json
      workers   Supervisor.start(); systemd READY=1
      loops     one thread per task over the one Supervisor
      main      WATCHDOG=1 and the terminal's status line until the loops end
      shutdown  STOPPING=1, close the supervisor (drain), stop the server,
                remove health.json and the pidfile; exit with the worst code

It runs in the foreground: systemd, supervisord or a container runtime
supervises it. SIGTERM or SIGINT reach the Supervisor's own handlers: the
call in flight drains, each loop writes a "stopped" checkpoint, exit 0. A
second signal stops at once.

The supervisor's own state (pidfile, health.json, cache, breaker) lives in
the main state directory; each task's checkpoint and iteration logs live in
the task's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ralph_supervisor import __version__
from ralph_supervisor.checkpoint import (
    COMPLETE,
    CheckpointCorrupt,
    CheckpointStore,
    utc_now,
    write_json_atomic,
)
from ralph_supervisor.config import ensure_private_dir
from ralph_supervisor.errors import ConfigError
from ralph_supervisor.health import assess
from ralph_supervisor.loop import (
    EXIT_OK,
    EXIT_USAGE,
    LoopResult,
    LoopSettings,
    RalphLoop,
    Task,
    worst_exit_code,
)

log = logging.getLogger(__name__)

PROG = "ralph-supervisor start"

PIDFILE_NAME = "ralph-supervisor.pid"
HEALTH_FILE_NAME = "health.json"

# How often the main thread wakes while the loops run: the status line's
# clock, and the watchdog when systemd asks for none.
TICK_TERMINAL = 1.0
TICK_QUIET = 5.0

# Names of tasks become directory names (STATE_DIR/tasks/NAME).
_UNSAFE_NAME_CHARS = frozenset('/\\\0:*?"<>|')


class StartError(Exception):
    """A reason not to start, told in one line; exit code 2 unless it says."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class StartOptions:
    """The `start` flags; None means "not given": the configuration decides."""

    config: str | None = None
    agent: str | None = None
    workdir: str | None = None
    prompt_file: str | None = None
    max_iterations: int | None = None
    max_runtime: float | None = None
    checkpoint_interval: int | None = None
    metrics_interval: int | None = None
    log_file: str | None = None
    log_level: str | None = None
    verbose: bool = False
    debug: bool = False
    health_port: int | None = None
    fresh: bool = False
    dry_run: bool = False

    def overrides(self) -> dict[str, Any]:
        """The flags as configuration overrides, the highest precedence."""
        pairs: dict[str, Any] = {
            "adapter.name": self.agent,
            "loop.prompt_file": self.prompt_file,
            "loop.max_iterations": self.max_iterations,
            "loop.max_runtime": self.max_runtime,
            "loop.checkpoint_interval": self.checkpoint_interval,
            "monitoring.metrics_interval": self.metrics_interval,
            "logging.file": self.log_file,
            "logging.level": self.log_level,
            "monitoring.health_check_port": self.health_port,
        }
        overrides = {key: value for key, value in pairs.items() if value is not None}
        if self.verbose:
            overrides["logging.verbose"] = True
        if self.debug:
            overrides["logging.debug"] = True
        return overrides


@dataclass
class StartPlan:
    """Everything `start` will do, checked, before anything is started."""

    config: Any
    workdir: Path
    state_dir: Path
    tasks: list[Task]
    settings: LoopSettings
    agent_argv: tuple[str, ...]
    agent_path: str | None
    warnings: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Planning


def build_plan(options: StartOptions) -> StartPlan:
    """Load and check everything; StartError or ConfigError says what is wrong."""
    from ralph_supervisor.config import load_config

    config = load_config(options.config, overrides=options.overrides())

    workdir = _existing_dir(options.workdir or os.getcwd(), "--workdir")
    state_dir = config.state_dir_for(workdir)
    tasks = _plan_tasks(config, workdir, state_dir)

    warnings: list[str] = []
    argv, agent_path = _resolve_agent(config)
    if agent_path is None:
        missing = (
            f"the agent command {argv[0]!r} (adapter.name {config.adapter.name}) is not "
            "on PATH; install it, or set adapter.command"
        )
        if not (options.dry_run and config.agent_name == "q"):
            raise StartError(missing)
        warnings.append(missing)

    _check_log_file(config.logging.file)

    return StartPlan(
        config=config,
        workdir=workdir,
        state_dir=state_dir,
        tasks=tasks,
        settings=LoopSettings.from_config(config),
        agent_argv=argv,
        agent_path=agent_path,
        warnings=warnings,
        overrides=options.overrides(),
    )


def _check_log_file(raw: str | None) -> None:
    """Say now, not after the workers start, that the log file cannot be written."""
    if not raw:
        return
    path = Path(os.path.abspath(os.path.expanduser(raw)))
    if path.is_dir():
        raise StartError(f"logging.file: {path} is a directory")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise StartError(f"logging.file: cannot write {path}: permission denied")
        return

    # The nearest directory that exists must let us create the rest.
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StartError(
            f"logging.file: cannot create {path}: {parent} is not writable for this user; "
            "create the directory with write access, or pass --log-file with a writable path"
        )


def _existing_dir(raw: str, what: str) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(raw)))
    if not path.exists():
        raise StartError(f"{what} {raw}: no such directory")
    if not path.is_dir():
        raise StartError(f"{what} {raw}: not a directory")
    return path


def locate_tasks(config: Any, workdir: Path, state_dir: Path) -> list[Task]:
    """Where each task lives, as `start` places it; nothing is checked here.

    Without `tasks:`, one task in the workdir, named after it, whose state
    is the main state directory. With them, each task's workdir is taken
    from the main workdir, and its state is TASK_WORKDIR/.ralph, or
    STATE_DIR/tasks/NAME when state.dir is set.
    """
    if not config.tasks:
        prompt = Path(os.path.abspath(workdir / config.loop.prompt_file))
        return [Task(workdir.name or "main", workdir, prompt, state_dir)]

    tasks = []
    for entry in config.tasks:
        task_dir = Path(os.path.abspath(workdir / Path(entry.workdir).expanduser()))
        if config.state.dir is not None:
            task_state = state_dir / "tasks" / str(entry.name)
        else:
            task_state = task_dir / ".ralph"
        prompt = Path(os.path.abspath(task_dir / entry.prompt_file))
        tasks.append(Task(str(entry.name), task_dir, prompt, task_state))
    return tasks


def _plan_tasks(config: Any, workdir: Path, state_dir: Path) -> list[Task]:
    tasks = locate_tasks(config, workdir, state_dir)
    if not config.tasks:
        _readable_prompt(tasks[0].prompt_file, "loop.prompt_file")
        return tasks

    seen: dict[Path, str] = {}
    for task in tasks:
        name = task.name
        if name in (".", "..") or any(ch in _UNSAFE_NAME_CHARS for ch in name):
            raise StartError(f"tasks: {name!r}: a task name must be usable as a directory name")
        _existing_dir(str(task.workdir), f"task {name}: workdir")
        _readable_prompt(task.prompt_file, f"task {name}: prompt_file")
        if task.state_dir in seen:
            raise StartError(
                f"tasks {seen[task.state_dir]!r} and {name!r} would share the state "
                f"directory {task.state_dir}; give them different workdirs, or set state.dir"
            )
        seen[task.state_dir] = name
    return tasks


def _readable_prompt(path: Path, what: str) -> Path:
    path = Path(os.path.abspath(path))
    try:
        with open(path, "rb") as stream:
            stream.read(1)
    except FileNotFoundError:
        raise StartError(f"{what}: {path}: no such file (write the task prompt there)") from None
    except IsADirectoryError:
        raise StartError(f"{what}: {path}: is a directory, not a prompt file") from None
    except OSError as error:
        raise StartError(f"{what}: {path}: cannot read it: {error.strerror}") from None
    return path


def _resolve_agent(config: Any) -> tuple[tuple[str, ...], str | None]:
    """The agent's command line (without the prompt) and its executable's path."""
    from ralph_supervisor.agents import profile_for

    argv = tuple(profile_for(config.adapter).command)
    if config.adapter.model:
        argv = (*argv, "--model", config.adapter.model)
    program = argv[0]
    if os.sep in program:
        found = program if os.access(program, os.X_OK) and os.path.isfile(program) else None
    else:
        found = shutil.which(program)
    return argv, found


def describe_plan(plan: StartPlan, out: IO[str]) -> None:
    """What --dry-run prints: the command, the limits, each task and its state."""
    config = plan.config
    settings = plan.settings
    monitoring = config.monitoring

    def line(label: str, value: object) -> None:
        out.write(f"  {label + ':':<18}{value}\n")

    out.write("ralph-supervisor start --dry-run: the configuration is valid\n")
    line("config file", config.path or "none (defaults and the environment)")
    line("agent", f"{config.agent_name}: {_shell_words(plan.agent_argv)} PROMPT")
    line("agent found", plan.agent_path or "NO (see the warning below)")
    line("workers", f"{config.performance.max_concurrent} (performance.max_concurrent)")
    line("workdir", plan.workdir)
    line("state dir", plan.state_dir)
    line("log", config.logging.file or "stderr")
    if monitoring.health_check_enabled:
        port = monitoring.health_check_port
        line(
            "health",
            f"http://{monitoring.health_check_host}:{port}/health"
            + (" (a free port is picked)" if port == 0 else ""),
        )
    else:
        line("health", "off (monitoring.health_check_enabled)")
    line(
        "limits",
        f"{settings.max_iterations} iterations, {settings.max_runtime:g} s, "
        f"{settings.max_consecutive_failures or 'any number of'} failures in a row",
    )
    line("no progress", _describe_progress_rules(settings))
    line(
        "checkpoints",
        f"every {settings.checkpoint_interval} iterations"
        + (", with a git commit" if settings.git_commit else ""),
    )
    line("metrics summary", f"every {settings.metrics_interval} iterations")
    line("completion", f"{settings.completion_promise!r} in an answer, or - [x] TASK_COMPLETE")

    for task in plan.tasks:
        out.write(f"  task {task.name}:\n")
        line("  workdir", task.workdir)
        line("  prompt file", f"{task.prompt_file} ({task.prompt_file.stat().st_size} bytes)")
        line("  state dir", task.state_dir)
        line("  checkpoint", _describe_checkpoint(task.state_dir))

    for warning in plan.warnings:
        out.write(f"warning: {warning}\n")


def _describe_progress_rules(settings: LoopSettings) -> str:
    idle, repeats = settings.max_idle_iterations, settings.max_repeats
    rules = [
        f"stalled after {idle} answers that change nothing (git work trees only)"
        if idle
        else "never stalled (loop.max_idle_iterations off)",
        f"repeating after {repeats} answers alike (>= {settings.repeat_similarity:g})"
        if repeats
        else "never repeating (loop.max_repeats off)",
    ]
    return "; ".join(rules)


def _describe_checkpoint(state_dir: Path) -> str:
    try:
        found = CheckpointStore(state_dir).peek()
    except CheckpointCorrupt as error:
        return f"unreadable ({error}); start moves it aside and begins anew"
    if found is None:
        return "none; starts at iteration 1"
    if found.status == COMPLETE:
        return f"complete after iteration {found.iteration}; start --fresh runs it again"
    return f"{found.status} after iteration {found.iteration}; resumes there"


def _shell_words(argv: tuple[str, ...]) -> str:
    return " ".join(shlex.quote(word) for word in argv)


# ---------------------------------------------------------------------------
# The pidfile


class AlreadyRunning(StartError):
    pass


class PidFile:
    """STATE_DIR/ralph-supervisor.pid, locked with flock while we live.

    The lock, not the pid in the file, is what says "running": the kernel
    drops it when the process dies however it dies, so a stale file is
    simply taken over, and a recycled pid can never look like us.
    """

    def __init__(self, path: Path, *, stop_hint: str = "ralph-supervisor stop") -> None:
        self.path = path
        self.stop_hint = stop_hint
        self._fd: int | None = None

    def acquire(self) -> None:
        """Lock and write the pidfile, or raise AlreadyRunning."""
        for _ in range(10):
            fd = self._open_locked()
            # A predecessor unlinks its file before it lets go of the lock:
            # a lock won on an unlinked file guards nothing. Open again.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise StartError(f"cannot take the pidfile {self.path}: it keeps being replaced")

        previous = _pid_from_text(os.pread(fd, 64, 0).decode("ascii", "replace"))
        if previous is not None and previous != os.getpid():
            log.info(
                "replacing a stale pidfile %s (pid %d is not running here)",
                self.path,
                previous,
                extra={"pidfile": str(self.path), "stale_pid": previous},
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _open_locked(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_pid(self.path)
            os.close(fd)
            raise AlreadyRunning(
                f"already running (pid {holder or 'unknown'}) with the state directory "
                f"{self.path.parent}; stop it first: {self.stop_hint}"
            ) from None
        except OSError as error:
            # No flock here (some network file systems): say so and go on
            # with the pid alone.
            log.warning("cannot lock the pidfile %s: %s", self.path, error)
            self._refuse_if_live(fd)
        return fd

    def _refuse_if_live(self, fd: int) -> None:
        holder = _pid_from_text(os.pread(fd, 64, 0).decode("ascii", "replace"))
        if holder is not None and holder != os.getpid() and is_ralph_process(holder):
            os.close(fd)
            raise AlreadyRunning(f"already running (pid {holder}); stop it first")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Unlink before unlocking, and only our own file: a successor that
        # took over a moment ago must keep its pidfile.
        with contextlib.suppress(OSError):
            if read_pid(self.path) == os.getpid():
                self.path.unlink()
        os.close(fd)


def _pid_from_text(text: str) -> int | None:
    word = text.strip().split()[0] if text.strip() else ""
    return int(word) if word.isdigit() and int(word) > 0 else None


def read_pid(path: Path) -> int | None:
    """The pid a pidfile names, or None (missing, empty, garbage)."""
    try:
        return _pid_from_text(path.read_text(encoding="ascii", errors="replace")[:64])
    except OSError:
        return None


def is_ralph_process(pid: int) -> bool:
    """Whether `pid` is alive and is a ralph-supervisor (by its command line)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        words = process.cmdline()
    except psutil.Error:
        return False
    return any(
        os.path.basename(word) in ("ralph-supervisor", "ralph_supervisor")
        or word.startswith("ralph_supervisor")
        for word in words
    )


# ---------------------------------------------------------------------------
# The status line


class StatusLine:
    """One line on a terminal, redrawn in place with a carriage return.

    It is also the stream the log handler writes to when logs go to the
    terminal: a log line clears the status line, is written, and the status
    line is drawn again below it, so the two never garble each other.

    Only refresh() computes the text, from the main thread; a log line from
    any other thread redraws the last text. Rendering reads the supervisor
    and the loops, and doing that from inside a log call could take a lock
    the logging thread already holds.
    """

    def __init__(self, stream: IO[str], render: Callable[[], str]) -> None:
        self.stream = stream
        self.render = render
        self._lock = threading.Lock()
        self._text = ""
        self._shown = False
        self._closed = False

    # The file-like side, for logging.StreamHandler.
    def write(self, text: str) -> int:
        with self._lock:
            self._clear()
            self.stream.write(text)
            if text.endswith("\n"):
                self._draw()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self.stream.flush()

    def isatty(self) -> bool:
        return True

    def refresh(self) -> None:
        """Compute the line afresh and draw it."""
        try:
            text = self.render()
        except Exception:
            log.debug("status line failed to render", exc_info=True)
            return
        width = shutil.get_terminal_size((100, 24)).columns - 1
        with self._lock:
            self._text = text[:width]
            self._clear()
            self._draw()
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            self._clear()
            self._closed = True
            self.stream.flush()

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[2K")
            self._shown = False

    def _draw(self) -> None:
        if self._closed or not self._text:
            return
        self.stream.write(self._text)
        self._shown = True


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ---------------------------------------------------------------------------
# The service


class Service:
    """One `start` run: the supervisor, the health server and the loops."""

    def __init__(self, plan: StartPlan, *, fresh: bool = False) -> None:
        self.plan = plan
        self.config = plan.config
        self.fresh = fresh
        self.pidfile = PidFile(
            plan.state_dir / PIDFILE_NAME,
            stop_hint=f"ralph-supervisor stop --workdir {shlex.quote(str(plan.workdir))}",
        )
        self.health_file = plan.state_dir / HEALTH_FILE_NAME
        self.started_at = time.monotonic()
        self.supervisor: Any = None
        self.metrics: Any = None
        self.server: Any = None
        self.console: Any = None
        self.notifier: Any = None
        self.status_line: StatusLine | None = None
        self.loops: list[RalphLoop] = []
        self.results: dict[str, LoopResult] = {}
        self._supervisor_started = False
        self._loops_done = threading.Event()
        self._loops_finished = 0
        self._count_lock = threading.Lock()

    def run(self) -> int:
        self._setup_logging()
        try:
            ensure_private_dir(self.plan.state_dir)
            self.pidfile.acquire()
        except StartError:
            raise
        except OSError as error:
            raise StartError(
                f"cannot use the state directory {self.plan.state_dir}: {error.strerror or error}"
            ) from None

        try:
            return self._run_locked()
        finally:
            self.pidfile.release()
            if self.status_line is not None:
                self.status_line.close()

    def _run_locked(self) -> int:
        from ralph_supervisor.metrics import Metrics
        from ralph_supervisor.supervisor import Supervisor

        log.info(
            "ralph-supervisor %s starting: agent %s, %d task(s), state in %s",
            __version__,
            self.config.agent_name,
            len(self.plan.tasks),
            self.plan.state_dir,
            extra={"pid": os.getpid(), "workdir": str(self.plan.workdir)},
        )
        self.metrics = Metrics()
        self.supervisor = Supervisor(
            self.config,
            state_dir=self.plan.state_dir,
            workdir=str(self.plan.workdir),
            metrics=self.metrics,
            reload_config=self._reload_config,
        )
        to_run = self._prepare_loops()
        if not to_run:
            return worst_exit_code(result.exit_code for result in self.results.values())

        try:
            self._start_health_server()
            self._start_supervisor()
            self._run_loops(to_run)
        finally:
            self._shut_down()

        return self._exit_code()

    def _reload_config(self) -> Any:
        """SIGHUP: the file and the environment again, under the same flags.

        Without the flags a reload would quietly drop --agent, --log-level
        and the rest.
        """
        from ralph_supervisor.config import load_config

        return load_config(self.config.path, overrides=self.plan.overrides)

    # -- steps --------------------------------------------------------------

    def _setup_logging(self) -> None:
        from ralph_supervisor.logs import setup_logging

        settings = self.config.logging
        # The status line is file-like enough for a StreamHandler.
        stream: Any = None
        if sys.stderr.isatty():
            self.status_line = StatusLine(sys.stderr, self._render_status)
            stream = self.status_line if not settings.file else None

        directory = Path(os.path.expanduser(settings.file)).parent if settings.file else None
        existed = directory is None or directory.is_dir()
        try:
            setup_logging(settings, stream=stream)
        except ConfigError as error:
            raise StartError(
                f"{error}; create the directory with write access for this user, "
                "or pass --log-file with a writable path"
            ) from None
        if not existed:
            log.info("created the log directory %s", directory)

    def _prepare_loops(self) -> list[RalphLoop]:
        """Load each task's checkpoint; return the loops that have work to do."""
        to_run = []
        for task in self.plan.tasks:
            loop = RalphLoop(
                self.supervisor,
                task,
                self.plan.settings,
                metrics=self.metrics,
            )
            self.loops.append(loop)
            done = loop.prepare(fresh=self.fresh)
            if done is None:
                to_run.append(loop)
                continue
            self.results[task.name] = done
            self._tell(done.message)
        return to_run

    def _start_health_server(self) -> None:
        monitoring = self.config.monitoring
        url = None
        if monitoring.health_check_enabled:
            from ralph_supervisor.server import HealthServer

            self.server = HealthServer(
                monitoring.health_check_host,
                monitoring.health_check_port,
                snapshot=self.snapshot,
                metrics=self.metrics,
                metrics_enabled=monitoring.metrics_enabled,
            )
            try:
                self.server.start()
            except ConfigError as error:
                self.server = None
                raise StartError(f"{error}; pick another with --health-port") from None
            url = self.server.url
            log.info(
                "health at %s/health%s",
                url,
                f", metrics at {url}/metrics" if monitoring.metrics_enabled else "",
                extra={"url": url},
            )
            self._start_console(url)
        self._write_health_file(url)

    def _start_console(self, url: str) -> None:
        from ralph_supervisor.console import Console, ConsoleSources

        sources = ConsoleSources(
            snapshot=self.snapshot,
            supervisor=lambda: self.supervisor if self._supervisor_started else None,
            loops=lambda: list(self.loops),
            metrics=self.metrics,
            # The SIGTERM path itself: the same drain, the same exit code.
            stop=lambda: os.kill(os.getpid(), signal.SIGTERM),
        )
        try:
            self.console = Console.for_service(
                sources, monitoring=self.config.monitoring, state_dir=self.plan.state_dir
            )
        except OSError as error:
            raise StartError(
                f"cannot write the console token in {self.plan.state_dir}: "
                f"{error.strerror or error}"
            ) from None
        self.console.install(self.server)

    def _write_health_file(self, url: str | None) -> None:
        host, port = self.server.address if self.server is not None else (None, None)
        record = {
            "pid": os.getpid(),
            "url": url,
            "host": host,
            "port": port,
            "started_at": utc_now(),
            "version": __version__,
            "agent": self.config.agent_name,
            "workdir": str(self.plan.workdir),
            "state_dir": str(self.plan.state_dir),
            "tasks": [
                {
                    "name": task.name,
                    "workdir": str(task.workdir),
                    "prompt_file": str(task.prompt_file),
                    "state_dir": str(task.state_dir),
                }
                for task in self.plan.tasks
            ],
        }
        write_json_atomic(self.health_file, record)

    def _start_supervisor(self) -> None:
        from ralph_supervisor.diagnostics import SystemdNotifier

        # Before start(): a SIGTERM while the workers come up is recorded
        # and handled by the supervisor loop, not by Python's default.
        self.supervisor.install_signal_handlers()
        self.supervisor.start()
        self._supervisor_started = True

        stats = self.supervisor.stats()
        log.info(
            "%d of %d workers ready",
            stats["workers_alive"],
            self.config.performance.max_concurrent,
            extra={"workers_alive": stats["workers_alive"]},
        )
        self.notifier = SystemdNotifier.from_env()
        if self.notifier is not None:
            self.notifier.ready(f"{stats['workers_alive']} workers ready")

    def _run_loops(self, loops: list[RalphLoop]) -> None:
        threads = []
        for loop in loops:
            thread = threading.Thread(
                target=self._run_one,
                args=(loop,),
                name=f"ralph-loop-{loop.task.name}",
                daemon=True,
            )
            threads.append(thread)
            thread.start()

        interval = self.notifier.watchdog_interval() if self.notifier is not None else None
        tick = TICK_TERMINAL if self.status_line is not None else TICK_QUIET
        if interval:
            tick = min(tick, interval)

        while True:
            # Clear before counting: a loop that ends after the count sets
            # the event again, and the wait below returns at once.
            self._loops_done.clear()
            if self._loops_finished >= len(threads):
                break
            if self.notifier is not None and interval and not self.supervisor.wait_closed(0):
                self.notifier.watchdog()
            if self.status_line is not None:
                self.status_line.refresh()
            self._loops_done.wait(tick)

        for thread in threads:
            thread.join()

    def _run_one(self, loop: RalphLoop) -> None:
        try:
            self.results[loop.task.name] = loop.run()
        finally:
            with self._count_lock:
                self._loops_finished += 1
            self._loops_done.set()

    def _shut_down(self) -> None:
        if self.notifier is not None:
            self.notifier.stopping("stopping: " + self._summary())
        if self.status_line is not None:
            self.status_line.close()
            self.status_line = None

        if self._supervisor_started:
            self.supervisor.close()
        if self.server is not None:
            self.server.stop()
        if self.console is not None:
            self.console.close()
        with contextlib.suppress(OSError):
            self.health_file.unlink()

        if not self.results:
            # Something failed before the loops ran; the caller reports it.
            log.info("ralph-supervisor stopped before any task ran")
            return
        log.info(
            "ralph-supervisor stopped: %s",
            self._summary(),
            extra={"exit_code": self._exit_code(), "runtime_s": round(self._uptime(), 1)},
        )
        if self.config.logging.file:
            # The log is in a file; whoever started us sees how it ended.
            print(f"{PROG}: stopped: {self._summary()}", file=sys.stderr)

    # -- reporting ----------------------------------------------------------

    def _exit_code(self) -> int:
        if not self.results:
            return EXIT_OK
        return worst_exit_code(result.exit_code for result in self.results.values())

    def _summary(self) -> str:
        parts = [
            f"task {result.task} {result.status} after iteration {result.iteration}: "
            f"{result.message}"
            for result in self.results.values()
        ]
        return "; ".join(parts) or "no task ran"

    def _uptime(self) -> float:
        return time.monotonic() - self.started_at

    def _tell(self, message: str) -> None:
        log.info(message)
        if self.config.logging.file:
            # The log is in a file; the person at the terminal wants the news.
            print(f"{PROG}: {message}", file=sys.stderr)

    def snapshot(self) -> dict[str, Any]:
        """The state /health reports; called from the server's threads."""
        supervisor = self.supervisor
        loops = {loop.task.name: loop.progress() for loop in self.loops}
        base: dict[str, Any] = {
            "adapter": self.config.agent_name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(self._uptime(), 1),
            "loop": loops,
        }
        if not self._supervisor_started:
            return base | {"status": "unhealthy", "reasons": ["starting: workers not up yet"]}

        stats = supervisor.stats()
        status, reasons = assess(stats)
        breaker = supervisor.guard.breaker.snapshot()

        return base | {
            "status": status,
            "reasons": reasons,
            "workers": stats["workers"],
            "workers_alive": stats["workers_alive"],
            "worker_restarts": stats["worker_restarts"],
            "breaker": breaker,
            "agents": stats.get("agents", []),
            "cache": stats.get("cache", {}),
            "queue": {"queued": stats["queued"], "in_flight": stats["in_flight"]},
            "requests": {"completed": stats["completed"], "failed": stats["failed"]},
        }

    def _render_status(self) -> str:
        if not self.loops:
            return "ralph: starting"
        tasks = []
        for loop in self.loops:
            progress = loop.progress()
            last = progress["last_outcome"] or "-"
            if progress["last_duration_s"] is not None:
                last += f" {progress['last_duration_s']:.1f}s"
            if progress["waiting_for_breaker"]:
                last = f"breaker wait ({progress['waiting_for_breaker']})"
            tasks.append(
                f"{progress['task']} {progress['iteration']}/{progress['max_iterations']} {last}"
                + _progress_counters(progress)
            )

        breaker = "-"
        workers = "-"
        if self._supervisor_started:
            stats = self.supervisor.stats()
            breaker = stats["breaker_state"]
            workers = f"{stats['workers_alive']}/{self.config.performance.max_concurrent}"
        return (
            f"ralph: {', '.join(tasks)} | {_clock(self._uptime())} | breaker {breaker} | "
            f"workers {workers}"
        )


def _progress_counters(progress: dict[str, Any]) -> str:
    """How near the task is to a no-progress stop, as " idle 2/5 same 1/3"."""
    counters = ""
    if progress.get("max_idle_iterations"):
        counters += f" idle {progress['idle_iterations']}/{progress['max_idle_iterations']}"
    if progress.get("max_repeats"):
        counters += f" same {progress['repeat_count']}/{progress['max_repeats']}"
    return counters


# ---------------------------------------------------------------------------
# The command


def run_start(options: StartOptions) -> int:
    """`ralph-supervisor start`: returns the exit code; never raises a usage error."""
    try:
        plan = build_plan(options)
        if options.dry_run:
            describe_plan(plan, sys.stdout)
            return EXIT_OK
        return Service(plan, fresh=options.fresh).run()
    except (StartError, ConfigError) as error:
        code = error.code if isinstance(error, StartError) else EXIT_USAGE
        _report(str(error))
        return code


def _report(message: str) -> None:
    """One line on stderr; in the log file too when there is one."""
    line = " ".join(message.split())
    if any(
        isinstance(handler, logging.FileHandler)
        for handler in logging.getLogger("ralph_supervisor").handlers
    ):
        log.error(line)
    print(f"{PROG}: {line}", file=sys.stderr)


def read_health_file(state_dir: Path) -> dict[str, Any] | None:
    """STATE_DIR/health.json as `start` wrote it, or None."""
    try:
        data = json.loads((state_dir / HEALTH_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
