"""One agent call, from spawn to reaped.

The runner knows nothing of workers, breakers or caches. It owns:

    spawn (no shell, new session, NO_COLOR=1, prompt as argv word or stdin)
      |
      v
    one selector over stdout, stderr, stdin (large prompts) and a pidfd
      |   non-blocking reads, buffer_size at a time; no sleeping
      |   deadline -> SIGTERM the group, grace, SIGKILL the group
      |   output limit / tree memory limit -> SIGKILL the group
      v
    agent exited -> drain its pipes briefly (a grandchild may hold them)
      -> SIGKILL whatever is left of the group -> reap
      v
    classify: limits, exit status, failure messages in stderr -> Response

The group is killed before the agent is reaped: the zombie keeps its pid,
and so the process group id, from being reused under us.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import re
import selectors
import signal
import subprocess
import termios
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ralph_supervisor.agents import CompiledPatterns
from ralph_supervisor.errors import (
    MemoryLimitExceeded,
    OutputTooLarge,
    QChatAuthError,
    QChatError,
    QChatProcessError,
    QChatServiceError,
    QChatThrottled,
    QChatTimeout,
)

# Linux caps one argv word at MAX_ARG_STRLEN, 32 pages (128 KiB). Keep a
# margin for the encoding and pass anything larger on stdin.
ARGV_PROMPT_LIMIT = 120 * 1024

# Failure messages are printed last; searching only the tail keeps a call
# that wrote 50 MB of stderr from paying for a regex over all of it.
PATTERN_TAIL_BYTES = 16 * 1024

# How many reads to take from one ready descriptor before asking the
# selector again: fewer system calls for large outputs.
READS_PER_WAKEUP = 16

ANSI_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: titles, hyperlinks
    r"|\x1b[@-Z\\-_]"  # two-byte escapes
)

ERROR_FOR_KIND: Mapping[str, type[QChatError]] = {
    "auth": QChatAuthError,
    "throttled": QChatThrottled,
    "service": QChatServiceError,
}

# Every agent carries its request id in this variable, so that an agent
# whose worker died before naming its process group can still be found.
REQUEST_ENV = "RALPH_SUPERVISOR_REQUEST"


def strip_ansi(text: str) -> str:
    # Most answers hold no escape at all: a scan is cheaper than a sub.
    return ANSI_ESCAPE.sub("", text) if "\x1b" in text else text


@dataclass(frozen=True)
class Limits:
    """What one call may use; all from the configuration."""

    buffer_size: int = 4096
    poll_interval: float = 0.1
    max_output_size: int = 10 * 1024 * 1024
    max_memory_mb: int | None = None
    kill_grace: float = 3.0

    # After the agent exits, how long a grandchild may keep its pipes open
    # before the rest of the group is killed.
    exit_linger: float = 0.5


@dataclass(frozen=True)
class CallSpec:
    """Everything one call needs; picklable, so it crosses the worker pipe."""

    argv: tuple[str, ...]
    prompt: str
    deadline: float  # time.monotonic(): one clock for every process on Linux
    stdin_argv: tuple[str, ...] | None = None
    prompt_option: str = ""  # glued before the prompt word: "--prompt="
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = Limits()
    patterns: CompiledPatterns | None = None
    agent: str = "q"
    request_id: str | None = None


@dataclass
class Response:
    """The answer of one call."""

    text: str
    stderr: str = ""
    exit_code: int = 0
    duration_s: float = 0.0
    attempts: int = 1
    cached: bool = False
    agent: str = "q"
    request_id: str | None = None

    def copy(self) -> Response:
        return Response(**vars(self))

    def as_hit(self, request_id: str | None) -> Response:
        """This stored response, as a cache hit for another request."""
        hit = self.copy()
        hit.cached = True
        hit.attempts = 0
        hit.duration_s = 0.0
        hit.request_id = request_id
        return hit


@dataclass
class _Collected:
    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    size: int = 0

    def text(self, stream: str) -> str:
        chunks = self.stdout if stream == "stdout" else self.stderr
        return b"".join(chunks).decode("utf-8", "replace")


def command_line(
    argv: tuple[str, ...],
    payload: bytes,
    stdin_argv: tuple[str, ...] | None = None,
    prompt_option: str = "",
) -> tuple[list[str], bytes | None]:
    """The argv to run and the bytes for stdin (None: stdin is /dev/null)."""
    if len(payload) + len(prompt_option) <= ARGV_PROMPT_LIMIT:
        return [*argv, prompt_option + payload.decode("utf-8")], None
    return list(stdin_argv or argv), payload


def run_call(spec: CallSpec, *, on_spawn: Callable[[int], None] | None = None) -> Response:
    """Run one agent call; return its Response or raise a QChatError.

    on_spawn(pgid) is called as soon as the agent runs, so that a worker
    can tell its parent which process group to kill if the worker dies.
    """
    started = time.monotonic()
    if started >= spec.deadline:
        raise QChatTimeout("the deadline passed before the call started", elapsed=0.0)

    payload = spec.prompt.encode("utf-8")
    argv, stdin_bytes = command_line(spec.argv, payload, spec.stdin_argv, spec.prompt_option)
    process = _spawn(spec, argv, with_stdin=stdin_bytes is not None)
    if on_spawn is not None:
        on_spawn(process.pid)

    call = _Call(spec, process, stdin_bytes, started)
    try:
        call.pump()
    finally:
        call.finish()

    return call.outcome()


def _spawn(spec: CallSpec, argv: list[str], *, with_stdin: bool) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(spec.env)
    env["NO_COLOR"] = "1"
    if spec.request_id:
        env[REQUEST_ENV] = spec.request_id

    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if with_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=spec.cwd,
            env=env,
            # No preexec_fn: it would make subprocess fork instead of vfork,
            # about 5 ms more for every call from a 40 MB worker.
            start_new_session=True,
            close_fds=True,
        )
    except FileNotFoundError as error:
        raise _not_startable(spec, argv, f"command not found: {argv[0]}") from error
    except PermissionError as error:
        raise _not_startable(spec, argv, f"cannot execute {argv[0]}: {error}") from error
    except NotADirectoryError as error:
        raise _not_startable(spec, argv, f"bad working directory {spec.cwd}") from error
    except OSError as error:
        raise _not_startable(spec, argv, f"cannot start {argv[0]}: {error}") from error


def _not_startable(spec: CallSpec, argv: list[str], reason: str) -> QChatProcessError:
    # Retrying cannot install a missing CLI, and the breaker should not
    # read a deployment mistake as a sick service.
    hint = " (is the agent CLI installed? set adapter.command or QCHAT_COMMAND)"
    error = QChatProcessError(reason + hint, exit_code=127, elapsed=0.0)
    error.retryable = False
    error.trips_breaker = False
    return error


class _Call:
    """The I/O loop of one running agent."""

    def __init__(
        self,
        spec: CallSpec,
        process: subprocess.Popen[bytes],
        stdin_bytes: bytes | None,
        started: float,
    ) -> None:
        self.spec = spec
        self.limits = spec.limits
        self.process = process
        self.pgid = process.pid
        self.started = started
        self.collected = _Collected()
        self.selector = selectors.DefaultSelector()
        self.open_streams: set[str] = set()
        self.stdin_view = memoryview(stdin_bytes) if stdin_bytes is not None else None
        self.pidfd: int | None = None

        self.exited_at: float | None = None
        self.terminated_at: float | None = None
        self.killed = False
        self.limit_error: tuple[type[QChatError], str] | None = None
        self.next_memory_sample = started

        self._register()

    def _register(self) -> None:
        assert self.process.stdout is not None and self.process.stderr is not None
        for name, pipe in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            os.set_blocking(pipe.fileno(), False)
            self.selector.register(pipe.fileno(), selectors.EVENT_READ, name)
            self.open_streams.add(name)

        if self.stdin_view is not None:
            assert self.process.stdin is not None
            os.set_blocking(self.process.stdin.fileno(), False)
            self.selector.register(self.process.stdin.fileno(), selectors.EVENT_WRITE, "stdin")

        # A pidfd becomes readable when the agent exits, without reaping
        # it: we learn of the exit even while a grandchild holds the pipes.
        self.pidfd = os.pidfd_open(self.process.pid)
        self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")

    # -- the loop ---------------------------------------------------------

    def pump(self) -> None:
        while not self._is_done():
            timeout = self._next_wakeup() - time.monotonic()
            events = self.selector.select(max(timeout, 0.0))

            for key, _ in events:
                if key.data == "exit":
                    self._on_exit()
                elif key.data == "stdin":
                    self._write_stdin()
                else:
                    self._read(int(key.fd), key.data)

            self._check_time()
            self._check_memory()

    def _is_done(self) -> bool:
        if self.exited_at is None:
            return False
        if not self.open_streams:
            return True
        # The agent is gone but something still holds its pipes open.
        return time.monotonic() >= self.exited_at + self.limits.exit_linger

    def _next_wakeup(self) -> float:
        # After SIGKILL only the exit is awaited; the second is a backstop.
        moments = [time.monotonic() + 1.0]
        if self.terminated_at is None and not self.killed:
            moments.append(self.spec.deadline)
        elif self.terminated_at is not None and not self.killed:
            moments.append(self.terminated_at + self.limits.kill_grace)
        if self.exited_at is not None:
            moments.append(self.exited_at + self.limits.exit_linger)
        if self.limits.max_memory_mb is not None and self.exited_at is None:
            moments.append(self.next_memory_sample)
        return min(moments)

    def _on_exit(self) -> None:
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        assert self.pidfd is not None
        self.selector.unregister(self.pidfd)

    def _read(self, fd: int, stream: str) -> None:
        chunks = self.collected.stdout if stream == "stdout" else self.collected.stderr
        for _ in range(READS_PER_WAKEUP):
            try:
                data = os.read(fd, self._read_size(fd))
            except BlockingIOError:
                return
            if not data:
                self.selector.unregister(fd)
                self.open_streams.discard(stream)
                return

            chunks.append(data)
            self.collected.size += len(data)
            if self.collected.size > self.limits.max_output_size:
                self._stop_for_limit(
                    OutputTooLarge,
                    f"output passed resources.max_output_size "
                    f"({self.limits.max_output_size} bytes)",
                )
                return

    def _read_size(self, fd: int) -> int:
        """buffer_size, or all that is waiting when more is.

        A full pipe holds 64 KiB; taking it in one read rather than sixteen
        is what lets 5 MiB of output arrive as fast as subprocess.run reads it.
        """
        waiting = array.array("i", [0])
        try:
            fcntl.ioctl(fd, termios.FIONREAD, waiting)
        except OSError:
            return self.limits.buffer_size
        return max(self.limits.buffer_size, waiting[0])

    def _write_stdin(self) -> None:
        assert self.process.stdin is not None and self.stdin_view is not None
        fd = self.process.stdin.fileno()
        try:
            written = os.write(fd, self.stdin_view[: 64 * 1024])
        except BlockingIOError:
            return
        except BrokenPipeError:
            # The agent stopped reading; it will exit and say why.
            written = len(self.stdin_view)

        self.stdin_view = self.stdin_view[written:]
        if not self.stdin_view:
            self.selector.unregister(fd)
            self.process.stdin.close()

    def _check_time(self) -> None:
        now = time.monotonic()
        if self.exited_at is not None:
            return

        if self.terminated_at is None and now >= self.spec.deadline:
            self.terminated_at = now
            self._signal_group(signal.SIGTERM)
        elif (
            self.terminated_at is not None
            and not self.killed
            and now >= self.terminated_at + self.limits.kill_grace
        ):
            self._kill_group()

    def _check_memory(self) -> None:
        limit_mb = self.limits.max_memory_mb
        now = time.monotonic()
        if limit_mb is None or self.exited_at is not None or now < self.next_memory_sample:
            return

        self.next_memory_sample = now + self.limits.poll_interval
        resident = tree_rss(self.process.pid)
        if resident > limit_mb * 1024 * 1024:
            self._stop_for_limit(
                MemoryLimitExceeded,
                f"the agent's processes held {resident // (1024 * 1024)} MB resident, "
                f"over resources.max_memory_mb ({limit_mb} MB)",
            )

    def _stop_for_limit(self, kind: type[QChatError], message: str) -> None:
        if self.limit_error is None:
            self.limit_error = (kind, message)
        self._kill_group()

    # -- ending -----------------------------------------------------------

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)

    def _kill_group(self) -> None:
        self.killed = True
        self._signal_group(signal.SIGKILL)

    def finish(self) -> None:
        """Kill what is left of the group, close everything, reap the agent.

        Runs on every path out of pump(), exceptions included, so that no
        call ever leaves a process or a descriptor behind.
        """
        self._signal_group(signal.SIGKILL)
        self.selector.close()

        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

        self.process.wait()

    def outcome(self) -> Response:
        elapsed = time.monotonic() - self.started
        stdout = strip_ansi(self.collected.text("stdout"))
        stderr = strip_ansi(self.collected.text("stderr"))
        returncode = self.process.returncode
        facts: dict[str, Any] = {"stderr": stderr, "output": stdout, "elapsed": elapsed}

        if self.limit_error is not None:
            limit_kind, message = self.limit_error
            raise limit_kind(message, **facts)

        if self.terminated_at is not None:
            raise QChatTimeout(
                f"no answer within the deadline ({elapsed:.1f} s); the agent's process "
                f"group was {'killed' if self.killed else 'terminated'}",
                **facts,
            )

        failure = None
        if self.spec.patterns is not None:
            failure = self.spec.patterns.match(_tails(stdout, stderr), returncode)
        if failure is not None:
            kind, matched = failure
            raise ERROR_FOR_KIND[kind](
                f"{self.spec.agent} reported {kind.replace('_', ' ')}: {matched!r} "
                f"(exit status {returncode})",
                exit_code=returncode,
                **facts,
            )

        if returncode < 0:
            signum = -returncode
            raise QChatProcessError(
                f"{self.spec.agent} was killed by {_signal_name(signum)}",
                signal=signum,
                **facts,
            )
        if returncode > 0:
            last_line = stderr.strip().splitlines()[-1:] or ["(no stderr)"]
            raise QChatProcessError(
                f"{self.spec.agent} exited with status {returncode}: {last_line[0][:200]}",
                exit_code=returncode,
                **facts,
            )

        return Response(
            text=stdout,
            stderr=stderr,
            exit_code=0,
            duration_s=elapsed,
            agent=self.spec.agent,
            request_id=self.spec.request_id,
        )


def _tails(stdout: str, stderr: str) -> dict[str, str]:
    return {"stdout": stdout[-PATTERN_TAIL_BYTES:], "stderr": stderr[-PATTERN_TAIL_BYTES:]}


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def kill_agents_of(request_id: str) -> int:
    """SIGKILL the process group of every agent running for this request.

    For an agent whose worker died before reporting its process group. It
    reads every process's environment, so it is for that rare case only.
    Returns how many groups were killed.
    """
    import psutil

    marker = request_id
    groups = set()
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if process.environ().get(REQUEST_ENV) == marker:
                groups.add(os.getpgid(process.pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    return len(groups)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 if gone).

    Resident, not address space: q is a Rust binary that reserves far more
    address space than it ever touches.
    """
    import psutil  # imported here: only calls with a memory limit pay for it

    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0

    total = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total
