"""The Ralph loop: the same task prompt, again and again, until the task is done.

    RalphLoop.run()  (one thread per task; every task shares one Supervisor)
      |
      +-> limits: max_iterations, max_runtime (counted across resumes)
      +-> read the prompt file afresh; "- [x] TASK_COMPLETE" in it: done
      +-> Supervisor.submit(prompt, cwd=workdir, timeout=runtime left)
      |     CircuitOpen: wait for the breaker's next trial (no iteration
      |     spent), up to loop.max_open_wait
      +-> keep the output in STATE_DIR/iterations/NNNN.log, log one line,
      |   append a record to STATE_DIR/history.jsonl (history.py): what the
      |   iteration changed in the work tree, and how like the last answer
      |   this one is
      +-> the completion promise in the answer: done
      +-> loop.max_consecutive_failures failed in a row: give up
      +-> no progress: loop.max_idle_iterations answers in a row that
      |   changed nothing (stalled), or loop.max_repeats answers in a row
      |   alike (repeating)
      +-> every checkpoint_interval iterations, and at every stop:
            checkpoint.json, then a git commit of the workdir

The loop never kills anything itself. A SIGTERM reaches the Supervisor,
which drains the call in flight and sets stop_requested; the loop records
that call's outcome, writes a checkpoint with status "stopped", and returns.

The result's exit code follows `start`'s table:

    0  complete, or stopped by a signal
    1  failed: failures in a row, the breaker open too long, a broken prompt
    3  a limit: max_iterations or max_runtime
    4  no progress: stalled or repeating
    2  bad usage or configuration (decided before the loop runs)

With several tasks the worst code wins, in the order 2 > 1 > 4 > 3 > 0.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ralph_supervisor.checkpoint import (
    COMPLETE,
    FAILED,
    RUNNING,
    STOPPED,
    Checkpoint,
    CheckpointStore,
    commit_message,
    commit_work_tree,
    move_aside,
    write_atomic,
)
from ralph_supervisor.config import ensure_private_dir
from ralph_supervisor.errors import (
    CircuitOpen,
    PromptRejected,
    QChatError,
    QChatTimeout,
    SupervisorClosed,
)
from ralph_supervisor.history import (
    HISTORY_NAME,
    Change,
    HistoryWriter,
    SnapshotFailed,
    WorkTreeProbe,
    output_digest,
    similarity,
)
from ralph_supervisor.runner import Response

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LIMIT = 3
EXIT_STALLED = 4

# Worst first: a usage error hides nothing, a failure outranks a stall, a
# stall outranks a limit, and a limit outranks success.
EXIT_SEVERITY = (EXIT_USAGE, EXIT_FAILED, EXIT_STALLED, EXIT_LIMIT, EXIT_OK)

TASK_COMPLETE_MARKER = re.compile(r"^\s*[-*+] \[[xX]\] TASK_COMPLETE\s*$", re.MULTILINE)

ITERATIONS_DIR = "iterations"
STDERR_SEPARATOR = "\n----- stderr -----\n"

# How long the loop waits on a call before looking at the supervisor again.
# Not a poll for the answer (the future wakes us); a guard against a
# supervisor that closed without resolving it.
FUTURE_CHECK_INTERVAL = 1.0
CLOSED_ANSWER_GRACE = 5.0

# With no retry_at (a trial call is running somewhere), look again this soon.
OPEN_RECHECK = 1.0

# How long to wait before reading a rejected prompt file again.
PROMPT_SETTLE = 1.0

# Durations kept for the summary's percentiles.
DURATION_WINDOW = 1000

# An error's message, cut to this length in a history record.
HISTORY_ERROR_CHARS = 300

# The reasons a loop that makes no progress stops with (exit 4).
STALLED = "stalled"
REPEATING = "repeating"


def worst_exit_code(codes: Iterable[int]) -> int:
    """The exit code of several tasks: the most severe of theirs."""
    known = [code if code in EXIT_SEVERITY else EXIT_FAILED for code in codes]
    return min(known, key=EXIT_SEVERITY.index, default=EXIT_OK)


def has_task_complete_marker(prompt: str) -> bool:
    return TASK_COMPLETE_MARKER.search(prompt) is not None


def iteration_log_name(number: int) -> str:
    return f"{number:04d}.log"


@dataclass(frozen=True)
class Task:
    """One loop to run: where, on which prompt file, with which state."""

    name: str
    workdir: Path
    prompt_file: Path
    state_dir: Path


@dataclass(frozen=True)
class LoopSettings:
    """The loop.* settings, with the few others the loop reads."""

    max_iterations: int = 100
    max_runtime: float = 14400.0
    checkpoint_interval: int = 5
    max_consecutive_failures: int | None = 5
    max_open_wait: float = 900.0
    max_idle_iterations: int | None = 5
    max_repeats: int | None = 3
    repeat_similarity: float = 0.95
    completion_promise: str = "LOOP_COMPLETE"
    git_commit: bool = True
    use_cache: bool = False
    metrics_interval: int | None = 60

    @classmethod
    def from_config(cls, config: Any) -> LoopSettings:
        loop = config.loop
        return cls(
            max_iterations=loop.max_iterations,
            max_runtime=loop.max_runtime,
            checkpoint_interval=loop.checkpoint_interval,
            # 0 and null both turn a rule off; None is the one way to say it here.
            max_consecutive_failures=loop.max_consecutive_failures or None,
            max_open_wait=loop.max_open_wait,
            max_idle_iterations=loop.max_idle_iterations or None,
            max_repeats=loop.max_repeats or None,
            repeat_similarity=loop.repeat_similarity,
            completion_promise=loop.completion_promise,
            git_commit=loop.git_commit,
            # A cached answer skips the agent's edits: off unless asked.
            use_cache=config.cache.loop_iterations,
            metrics_interval=config.monitoring.metrics_interval,
        )


@dataclass
class LoopResult:
    """How a task's loop ended."""

    task: str
    status: str  # complete, stopped, failed
    exit_code: int
    reason: str
    message: str
    iteration: int


@dataclass
class _Outcome:
    """One finished iteration."""

    number: int
    outcome: str  # success, complete, or an error kind
    duration_s: float
    attempts: int
    response: Response | None = None
    error: QChatError | None = None
    started_at: float = 0.0  # time.time(), for the history
    change: Change | None = None  # None: not measured
    similarity: float | None = None  # to the last answer; None: nothing to compare

    @property
    def output(self) -> str:
        if self.response is not None:
            return self.response.text
        return getattr(self.error, "partial_output", "") or ""

    @property
    def ok(self) -> bool:
        return self.error is None


class _Stop(Exception):
    """Ends the loop with a result; raised from deep inside a step."""

    def __init__(self, status: str, exit_code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code
        self.reason = reason
        self.message = message


class RalphLoop:
    """One task's loop over a shared Supervisor. Run it in its own thread."""

    def __init__(
        self,
        supervisor: Any,
        task: Task,
        settings: LoopSettings,
        *,
        metrics: Any = None,
        stop_event: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.supervisor = supervisor
        self.task = task
        self.settings = settings
        self.metrics = metrics
        self.stop_event = stop_event or threading.Event()
        self.clock = clock
        self.store = CheckpointStore(task.state_dir)
        self.iterations_dir = task.state_dir / ITERATIONS_DIR
        self.history = HistoryWriter(task.state_dir / HISTORY_NAME)
        self.probe = WorkTreeProbe(task.workdir, task.state_dir)

        self.state = Checkpoint(task=task.name)
        self.resumed_from: int | None = None
        self.result: LoopResult | None = None

        self._lock = threading.Lock()
        self._run_started: float | None = None
        self._runtime_before = 0.0
        self._open_since: float | None = None
        self._breaker_note: str | None = None
        self._rejected_once = False
        self._durations: collections.deque[float] = collections.deque(maxlen=DURATION_WINDOW)
        self._last_duration: float | None = None

        # Progress: the work tree before the next iteration (None: not
        # measured), the last answer, and the kinds of the failures in a row.
        self._measuring = False
        self._tree: str | None = None
        self._snapshot_failing = False
        self._last_answer: str | None = None
        self._failure_kinds: list[str] = []

    # -- preparing ----------------------------------------------------------

    def prepare(self, *, fresh: bool = False) -> LoopResult | None:
        """Load or start the checkpoint. A result means there is nothing to run.

        --fresh moves the old checkpoint and iteration logs aside. A complete
        checkpoint ends here (unless fresh): the task is already done.
        """
        ensure_private_dir(self.task.state_dir)
        if fresh:
            self._move_old_run_aside()

        previous = self.store.load()
        if previous is not None and previous.status == COMPLETE:
            self.state = previous
            return self._already(
                COMPLETE,
                EXIT_OK,
                "already_complete",
                f"task {self.task.name} is already complete (iteration {previous.iteration}, "
                f"{previous.stop_reason or 'complete'}); start --fresh to run it again",
            )

        if previous is None:
            self.state = Checkpoint(task=self.task.name)
        else:
            self._resume(previous)

        self.state.pid = os.getpid()
        self.state.workdir = str(self.task.workdir)
        self.state.prompt_file = str(self.task.prompt_file)
        self.state.status = RUNNING
        self.state.stop_reason = None
        self.state.stop_message = None
        # A new run gets a fresh allowance of failures and of idle or
        # repeated answers: a restart is often the operator's fix (a new
        # login, a network back, a clearer prompt).
        self.state.consecutive_failures = 0
        self.state.idle_iterations = 0
        self.state.repeat_count = 0
        self._runtime_before = self.state.runtime_s
        return None

    def _move_old_run_aside(self) -> None:
        kept = self.store.move_aside("fresh")
        logs = move_aside(self.iterations_dir, "fresh")
        move_aside(self.history.path, "fresh")
        if kept is not None or logs is not None:
            log.info(
                "task %s: starting fresh; the old checkpoint is kept as %s",
                self.task.name,
                kept,
                extra={"task": self.task.name, "kept_as": str(kept), "logs_kept_as": str(logs)},
            )

    def _resume(self, previous: Checkpoint) -> None:
        previous.task = self.task.name
        previous.runs += 1
        self.state = previous
        self.resumed_from = previous.iteration
        log.info(
            "task %s: resuming after iteration %d (checkpoint of %s, status %s)",
            self.task.name,
            previous.iteration,
            previous.updated_at,
            previous.status,
            extra={"task": self.task.name, "iteration": previous.iteration},
        )
        self._keep_unrecorded_logs(previous.iteration)

    def _keep_unrecorded_logs(self, recorded: int) -> None:
        # Iterations after the checkpoint ran, but the process died before
        # the next one: their numbers come round again. Keep their logs.
        if not self.iterations_dir.is_dir():
            return
        for path in self.iterations_dir.glob("*.log"):
            if path.stem.isdigit() and int(path.stem) > recorded:
                move_aside(path, "before-resume")

    def _already(self, status: str, code: int, reason: str, message: str) -> LoopResult:
        self.result = LoopResult(
            self.task.name, status, code, reason, message, self.state.iteration
        )
        return self.result

    # -- running ------------------------------------------------------------

    def run(self) -> LoopResult:
        """Iterate until done, a limit, too many failures, or a stop request."""
        if self.result is not None:
            return self.result

        self._run_started = self.clock()
        try:
            self._start_measuring()
            while True:
                self._step()
        except _Stop as stop:
            result = self._finish(stop.status, stop.exit_code, stop.reason, stop.message)
        except Exception as error:
            # A bug of ours: still leave a checkpoint and a reason behind.
            log.critical(
                "task %s: the loop failed",
                self.task.name,
                exc_info=True,
                extra={"task": self.task.name},
            )
            result = self._finish(
                FAILED, EXIT_FAILED, "internal_error", f"internal error: {error!r}"
            )
        return result

    def _step(self) -> None:
        """One iteration, or one wait for the breaker.

        The checks come first, so that a task already marked done, or past
        its limits after a resume, spends nothing.
        """
        self._check_stop()
        self._check_limits()

        prompt = self._read_prompt()
        if has_task_complete_marker(prompt):
            raise self._complete("task_complete_marker", "the prompt file marks the task done")

        self._snapshot_before()
        number = self.state.iteration + 1
        started = self.clock()
        started_at = time.time()
        try:
            future = self._submit(prompt)
            response = self._wait(future)
        except CircuitOpen as error:
            # Refused by the breaker: no iteration number is spent. A retry
            # refused after a failed first attempt lands here too; that
            # attempt is in the breaker's count, not in the loop's.
            self._wait_for_breaker(error)
            return
        except PromptRejected as error:
            self._on_rejected(error)
            return
        except QChatError as error:
            outcome = self._record(number, started, started_at, None, error)
        else:
            outcome = self._record(number, started, started_at, response, None)

        self._after(outcome)

    def _on_rejected(self, error: PromptRejected) -> None:
        """Read the prompt once more before giving up on it.

        An editor that truncates and rewrites the file can be caught halfway,
        with the file empty; a second look a moment later sees the whole.
        """
        if self._rejected_once:
            raise _Stop(
                FAILED,
                EXIT_FAILED,
                "prompt_rejected",
                f"the prompt in {self.task.prompt_file} was rejected: {error}",
            )
        self._rejected_once = True
        log.warning(
            "task %s: the prompt was rejected (%s); reading it again in %.0f s",
            self.task.name,
            error,
            PROMPT_SETTLE,
            extra={"task": self.task.name},
        )
        self._sleep(PROMPT_SETTLE)

    def _sleep(self, seconds: float) -> None:
        """Wait, but end the loop at once on a stop request."""
        wake_at = self.clock() + seconds
        while not self._stop_requested():
            left = wake_at - self.clock()
            if left <= 0:
                return
            self.supervisor.stop_requested.wait(min(left, OPEN_RECHECK))
        self._check_stop()

    def _submit(self, prompt: str) -> Future[Response]:
        """Hand one call to the supervisor, with the runtime left as its timeout."""
        try:
            future: Future[Response] = self.supervisor.submit(
                prompt,
                cwd=str(self.task.workdir),
                timeout=max(self._runtime_left(), 0.001),
                use_cache=self.settings.use_cache,
            )
        except SupervisorClosed:
            # Closing before the call began: nothing ran, nothing to record.
            self._check_stop()
            raise _Stop(
                FAILED,
                EXIT_FAILED,
                "supervisor_closed",
                "the supervisor stopped while the loop was running",
            ) from None
        return future

    def _wait(self, future: Future[Response]) -> Response:
        closed_at: float | None = None
        while True:
            try:
                return future.result(timeout=FUTURE_CHECK_INTERVAL)
            except FutureTimeout:
                pass
            if not self.supervisor.wait_closed(0):
                continue
            # The supervisor resolves every call before it closes; this is
            # the guard against a bug that would hang the loop for ever.
            closed_at = closed_at if closed_at is not None else self.clock()
            if self.clock() - closed_at >= CLOSED_ANSWER_GRACE:
                raise SupervisorClosed("the supervisor closed without answering the call")

    # -- after an iteration -------------------------------------------------

    def _record(
        self,
        number: int,
        started: float,
        started_at: float,
        response: Response | None,
        error: QChatError | None,
    ) -> _Outcome:
        duration = self.clock() - started
        if response is not None:
            done = self.settings.completion_promise in response.text
            attempts = response.attempts
            outcome = _Outcome(number, "complete" if done else "success", duration, attempts)
            outcome.response = response
        else:
            assert error is not None
            outcome = _Outcome(number, error.kind, duration, error.attempts, error=error)
        outcome.started_at = started_at
        outcome.change = self._measure_change()
        if response is not None and self._last_answer is not None:
            outcome.similarity = similarity(
                self._last_answer, response.text, self.settings.repeat_similarity
            )

        self._rejected_once = False
        with self._lock:
            state = self.state
            state.iteration = number
            state.attempts += outcome.attempts
            state.last_outcome = outcome.outcome
            if outcome.ok:
                state.successes += 1
                state.consecutive_failures = 0
                state.last_error = None
                self._failure_kinds.clear()
            else:
                kind = outcome.outcome
                state.failures[kind] = state.failures.get(kind, 0) + 1
                state.consecutive_failures += 1
                state.last_error = str(error)
                self._failure_kinds.append(kind)
            self._count_progress(outcome)
            self._durations.append(duration)
            self._last_duration = duration

        self._write_iteration_log(outcome)
        self._append_history(outcome)
        self._log_iteration(outcome)
        if self.metrics is not None:
            self.metrics.loop_iteration(self.task.name, outcome.outcome)
        return outcome

    def _after(self, outcome: _Outcome) -> None:
        """Decide, after an iteration, whether the loop goes on."""
        if outcome.ok:
            self._open_since = None
            self._breaker_note = None

        number = outcome.number
        interval = self.settings.metrics_interval
        if interval and number % interval == 0:
            self._log_summary()

        if outcome.outcome == "complete":
            raise self._complete(
                "completion_promise",
                f"the answer of iteration {number} holds {self.settings.completion_promise!r}",
            )

        if isinstance(outcome.error, SupervisorClosed):
            self._check_stop()
            raise _Stop(
                FAILED,
                EXIT_FAILED,
                "supervisor_closed",
                "the supervisor stopped while the loop was running",
            )

        # A call cut by the runtime limit ends the loop as the limit it is,
        # not as one more failure in a row.
        if isinstance(outcome.error, QChatTimeout) and self._runtime_left() <= 0:
            self._check_limits()

        failures = self.state.consecutive_failures
        limit = self.settings.max_consecutive_failures
        if limit and failures >= limit:
            raise _Stop(
                FAILED,
                EXIT_FAILED,
                "consecutive_failures",
                f"{failures} iterations failed in a row with {self._failure_names()} "
                f"(loop.max_consecutive_failures={limit}); the last: {self.state.last_error}",
            )

        self._check_progress()

        if number % self.settings.checkpoint_interval == 0:
            self._checkpoint(RUNNING)

    def _complete(self, reason: str, message: str) -> _Stop:
        return _Stop(COMPLETE, EXIT_OK, reason, message)

    def _failure_names(self) -> str:
        """The error kinds of the failures in a row: "timeout", "timeout x2, auth x1"."""
        counts = collections.Counter(self._failure_kinds)
        if len(counts) == 1:
            return next(iter(counts))
        return ", ".join(f"{kind} x{count}" for kind, count in counts.most_common())

    # -- progress: stalled, repeating ----------------------------------------

    def _start_measuring(self) -> None:
        """Find out once whether the work tree's changes can be measured."""
        self._measuring = self.probe.start()
        if self._measuring or not self.settings.max_idle_iterations:
            return
        log.warning(
            "task %s: %s is not in a git work tree, so changes cannot be measured: "
            "the no-change rule (loop.max_idle_iterations) is off for this run",
            self.task.name,
            self.task.workdir,
            extra={"task": self.task.name, "workdir": str(self.task.workdir)},
        )

    def _snapshot(self) -> str | None:
        """The work tree as a git tree id, or None when it cannot be had."""
        if not self._measuring:
            return None
        try:
            tree = self.probe.snapshot()
        except SnapshotFailed as error:
            if not self._snapshot_failing:
                log.warning(
                    "task %s: cannot snapshot the work tree (%s); changes go unmeasured "
                    "and the no-change rule waits until it works again",
                    self.task.name,
                    error,
                    extra={"task": self.task.name},
                )
            self._snapshot_failing = True
            return None
        if self._snapshot_failing:
            log.info("task %s: work tree snapshots work again", self.task.name)
        self._snapshot_failing = False
        return tree

    def _snapshot_before(self) -> None:
        # The tree after one iteration is the tree before the next; only the
        # first iteration of a run (or one after a failed snapshot) needs one.
        if self._tree is None:
            self._tree = self._snapshot()

    def _measure_change(self) -> Change | None:
        before, after = self._tree, self._snapshot()
        self._tree = after
        if before is None or after is None:
            return None
        try:
            return self.probe.diff(before, after)
        except SnapshotFailed as error:
            log.warning(
                "task %s: cannot measure what the iteration changed: %s",
                self.task.name,
                error,
                extra={"task": self.task.name},
            )
            return None

    def _count_progress(self, outcome: _Outcome) -> None:
        """Update the idle and repeat counters; the caller holds the lock.

        Only answers count. A failed call is the failure rule's business:
        it neither counts as idle nor breaks a row of repeated answers,
        though a change it left behind is progress all the same.
        """
        state = self.state
        change = outcome.change
        if change is not None and change.changed:
            state.idle_iterations = 0
        elif change is not None and outcome.ok:
            state.idle_iterations += 1

        if outcome.response is None:
            return
        alike = outcome.similarity is not None and (
            outcome.similarity >= self.settings.repeat_similarity
        )
        state.repeat_count = state.repeat_count + 1 if alike else 1
        self._last_answer = outcome.response.text

    def _check_progress(self) -> None:
        """Stop a loop whose agent answers but gets nowhere (exit 4)."""
        state = self.state
        idle_limit = self.settings.max_idle_iterations
        if idle_limit and self._measuring and state.idle_iterations >= idle_limit:
            raise _Stop(
                STOPPED,
                EXIT_STALLED,
                STALLED,
                f"no change to the work tree in {state.idle_iterations} iterations in a row "
                f"(loop.max_idle_iterations={idle_limit}): the agent answers but edits "
                f"nothing; read its answers in {self.iterations_dir}, then fix the prompt",
            )

        repeat_limit = self.settings.max_repeats
        if repeat_limit and state.repeat_count >= repeat_limit:
            raise _Stop(
                STOPPED,
                EXIT_STALLED,
                REPEATING,
                f"the same answer {state.repeat_count} times in a row (similarity >= "
                f"{self.settings.repeat_similarity:g}, loop.max_repeats={repeat_limit}): the "
                f"agent is going round in circles; read its answers in {self.iterations_dir}",
            )

    # -- limits, stops, the breaker -----------------------------------------

    def _runtime(self) -> float:
        started = self._run_started if self._run_started is not None else self.clock()
        return self._runtime_before + (self.clock() - started)

    def _runtime_left(self) -> float:
        return self.settings.max_runtime - self._runtime()

    def _check_limits(self) -> None:
        if self.state.iteration >= self.settings.max_iterations:
            raise _Stop(
                STOPPED,
                EXIT_LIMIT,
                "max_iterations",
                f"reached {self.state.iteration} iterations (loop.max_iterations="
                f"{self.settings.max_iterations}); raise --max-iterations to go on",
            )
        if self._runtime_left() <= 0:
            raise _Stop(
                STOPPED,
                EXIT_LIMIT,
                "max_runtime",
                f"ran for {self._runtime():.1f} s (loop.max_runtime="
                f"{self.settings.max_runtime:g} s); raise --max-runtime to go on",
            )

    def _stop_requested(self) -> bool:
        return self.stop_event.is_set() or self.supervisor.stop_requested.is_set()

    def _check_stop(self) -> None:
        if self._stop_requested():
            raise _Stop(STOPPED, EXIT_OK, "signal", "stopped on request")

    def _wait_for_breaker(self, error: CircuitOpen) -> None:
        """Wait for the breaker's next trial instead of spinning against it."""
        now = self.clock()
        if self._open_since is None:
            self._open_since = now
        waited = now - self._open_since
        if waited >= self.settings.max_open_wait:
            raise _Stop(
                FAILED,
                EXIT_FAILED,
                "breaker_open",
                f"the circuit breaker stayed open for {waited:.0f} s "
                f"(loop.max_open_wait={self.settings.max_open_wait:g} s): {error}",
            )

        retry_at = getattr(error, "retry_at", None)
        delay = OPEN_RECHECK if retry_at is None else retry_at - time.time()
        delay = min(
            max(delay, 0.05),
            self.settings.max_open_wait - waited,
            max(self._runtime_left(), 0.0),
        )
        note = "a trial call is running" if retry_at is None else f"next trial in {delay:.0f} s"
        if self._breaker_note is None:
            log.warning(
                "task %s: the circuit breaker is open; waiting (%s)",
                self.task.name,
                note,
                extra={"task": self.task.name, "wait_s": round(delay, 3)},
            )
        self._breaker_note = note

        self._sleep(delay)

    # -- the prompt ---------------------------------------------------------

    def _read_prompt(self) -> str:
        try:
            return self.task.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise _Stop(
                FAILED,
                EXIT_FAILED,
                "prompt_unreadable",
                f"cannot read the prompt file {self.task.prompt_file}: {reason}",
            ) from None

    # -- records ------------------------------------------------------------

    def _write_iteration_log(self, outcome: _Outcome) -> None:
        path = self.iterations_dir / iteration_log_name(outcome.number)
        if outcome.response is not None:
            text = outcome.response.text + STDERR_SEPARATOR + outcome.response.stderr
        else:
            error = outcome.error
            assert error is not None
            text = (
                f"error: {error.kind}: {error}\n"
                f"----- partial output -----\n{getattr(error, 'partial_output', '')}"
                f"{STDERR_SEPARATOR}{getattr(error, 'stderr_tail', '')}"
            )
        try:
            ensure_private_dir(self.iterations_dir)
            write_atomic(path, text.encode("utf-8", "replace"))
        except OSError as error:
            log.warning(
                "task %s: cannot keep the output of iteration %d in %s: %s",
                self.task.name,
                outcome.number,
                path,
                error,
                extra={"task": self.task.name, "iteration": outcome.number},
            )

    def _append_history(self, outcome: _Outcome) -> None:
        error = outcome.error
        change = outcome.change
        digest, size = output_digest(outcome.output)
        agent = outcome.response.agent if outcome.response is not None else None
        started_at = datetime.fromtimestamp(outcome.started_at, UTC)
        record = {
            "task": self.task.name,
            "run": self.state.runs,
            "number": outcome.number,
            "agent": agent if agent is not None else getattr(error, "agent", None),
            "started_at": started_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "duration_s": round(outcome.duration_s, 3),
            "outcome": outcome.outcome,
            "error_type": type(error).__name__ if error is not None else None,
            "error": str(error)[:HISTORY_ERROR_CHARS] if error is not None else None,
            "attempts": outcome.attempts,
            "output_sha256": digest,
            "output_bytes": size,
            "promise": self.settings.completion_promise in outcome.output,
            "files_changed": change.files if change is not None else None,
            "lines_added": change.added if change is not None else None,
            "lines_removed": change.removed if change is not None else None,
            "paths": change.paths if change is not None else None,
            "similarity": None if outcome.similarity is None else round(outcome.similarity, 3),
            "idle_iterations": self.state.idle_iterations,
            "repeat_count": self.state.repeat_count,
        }
        try:
            ensure_private_dir(self.task.state_dir)
            self.history.append(record)
        except OSError as failure:
            log.warning(
                "task %s: cannot append iteration %d to the history %s: %s",
                self.task.name,
                outcome.number,
                self.history.path,
                failure,
                extra={"task": self.task.name, "iteration": outcome.number},
            )

    def _log_iteration(self, outcome: _Outcome) -> None:
        change = outcome.change
        fields: dict[str, Any] = {
            "task": self.task.name,
            "iteration": outcome.number,
            "duration_s": round(outcome.duration_s, 3),
            "outcome": outcome.outcome,
            "attempts": outcome.attempts,
            "idle_iterations": self.state.idle_iterations,
            "repeat_count": self.state.repeat_count,
        }
        if change is not None:
            fields |= {
                "files_changed": change.files,
                "lines_added": change.added,
                "lines_removed": change.removed,
            }
        if outcome.ok:
            log.info(
                "task %s: iteration %d %s in %.2f s (%d attempt%s)%s",
                self.task.name,
                outcome.number,
                outcome.outcome,
                outcome.duration_s,
                outcome.attempts,
                "" if outcome.attempts == 1 else "s",
                self._describe_progress(change),
                extra=fields,
            )
            return
        allowed = self.settings.max_consecutive_failures
        log.warning(
            "task %s: iteration %d failed in %.2f s (%d attempt%s): %s; "
            "%d failed in a row of %s allowed",
            self.task.name,
            outcome.number,
            outcome.duration_s,
            outcome.attempts,
            "" if outcome.attempts == 1 else "s",
            outcome.error,
            self.state.consecutive_failures,
            allowed if allowed else "any number",
            extra=fields,
        )

    def _describe_progress(self, change: Change | None) -> str:
        """What the iteration changed, or for how long nothing: "; 2 files changed, +10 -3"."""
        state = self.state
        parts = []
        if change is not None and change.changed:
            plural = "" if change.files == 1 else "s"
            parts.append(f"{change.files} file{plural} changed, +{change.added} -{change.removed}")
        elif change is not None:
            parts.append(f"no change, {state.idle_iterations} in a row")
        if state.repeat_count > 1:
            parts.append(f"the same answer {state.repeat_count} times in a row")
        return "".join(f"; {part}" for part in parts)

    def _log_summary(self) -> None:
        stats = self._supervisor_stats()
        durations = sorted(self._durations)
        state = self.state
        fields: dict[str, Any] = {
            "task": self.task.name,
            "iteration": state.iteration,
            "successes": state.successes,
            "failures": dict(state.failures),
            "attempts": state.attempts,
            "p50_s": _percentile(durations, 0.50),
            "p90_s": _percentile(durations, 0.90),
            "p99_s": _percentile(durations, 0.99),
            "cache_hits": stats.get("cache_hits"),
            "cache_misses": stats.get("cache_misses"),
            "breaker_state": stats.get("breaker_state"),
            "workers_alive": stats.get("workers_alive"),
            "worker_restarts": stats.get("worker_restarts"),
        }
        log.info(
            "task %s summary after %d iterations: %d succeeded, %d failed; "
            "p50 %s s, p90 %s s, p99 %s s; cache %s hits / %s misses; breaker %s; "
            "%s workers alive, %s restarts",
            self.task.name,
            state.iteration,
            state.successes,
            state.failed_iterations,
            fields["p50_s"],
            fields["p90_s"],
            fields["p99_s"],
            fields["cache_hits"],
            fields["cache_misses"],
            fields["breaker_state"],
            fields["workers_alive"],
            fields["worker_restarts"],
            extra=fields,
        )

    def _supervisor_stats(self) -> dict[str, Any]:
        try:
            return dict(self.supervisor.stats())
        except Exception:
            log.debug("supervisor stats unavailable", exc_info=True)
            return {}

    def _checkpoint(
        self, status: str, reason: str | None = None, message: str | None = None
    ) -> None:
        """Write checkpoint.json, then commit the workdir; neither ever raises."""
        with self._lock:
            self.state.status = status
            self.state.stop_reason = reason
            self.state.stop_message = message
            self.state.runtime_s = round(self._runtime(), 3)
            number = self.state.iteration

        if self.settings.git_commit and number > 0:
            body = f"Task: {self.task.name}\nStatus: {status}" + (
                f"\nReason: {reason}" if reason else ""
            )
            outcome = commit_work_tree(
                self.task.workdir,
                self.task.state_dir,
                commit_message(number, self.task.name),
                body=body,
            )
            if outcome.committed:
                self.state.commit = outcome.sha

        try:
            self.store.save(self.state)
        except OSError as error:
            log.error(
                "task %s: cannot write the checkpoint %s: %s; a restart will resume "
                "from the previous one",
                self.task.name,
                self.store.path,
                error,
                extra={"task": self.task.name, "iteration": number},
            )
            return
        if self.metrics is not None:
            self.metrics.checkpoint(self.task.name)
        log.debug(
            "task %s: checkpoint written after iteration %d (%s)",
            self.task.name,
            number,
            status,
            extra={"task": self.task.name, "iteration": number, "status": status},
        )

    def _finish(self, status: str, code: int, reason: str, message: str) -> LoopResult:
        self._checkpoint(status, reason, message)
        level = logging.INFO if code in (EXIT_OK, EXIT_LIMIT) else logging.ERROR
        log.log(
            level,
            "task %s %s after iteration %d: %s",
            self.task.name,
            status,
            self.state.iteration,
            message,
            extra={
                "task": self.task.name,
                "status": status,
                "reason": reason,
                "iteration": self.state.iteration,
                "exit_code": code,
            },
        )
        return self._already(status, code, reason, message)

    # -- for the status line and /health ------------------------------------

    def progress(self) -> dict[str, Any]:
        """A snapshot of the task's state; safe from any thread.

        idle_iterations: answers in a row that changed nothing in the work
        tree; max_idle_iterations is None when that rule is off (by the
        configuration, or for want of git). repeat_count: answers in a row
        alike, the last included (1: the last answer was new).
        """
        with self._lock:
            state = self.state
            result = self.result
            return {
                "task": self.task.name,
                "workdir": str(self.task.workdir),
                "iteration": state.iteration,
                "max_iterations": self.settings.max_iterations,
                "status": result.status if result else state.status,
                "last_outcome": state.last_outcome,
                "last_duration_s": None
                if self._last_duration is None
                else round(self._last_duration, 3),
                "consecutive_failures": state.consecutive_failures,
                "successes": state.successes,
                "failures": dict(state.failures),
                "runtime_s": round(self._runtime(), 1),
                "waiting_for_breaker": self._breaker_note,
                "idle_iterations": state.idle_iterations,
                "max_idle_iterations": self.settings.max_idle_iterations
                if self._measuring
                else None,
                "repeat_count": state.repeat_count,
                "max_repeats": self.settings.max_repeats,
                "stop_reason": result.reason if result else None,
                "stop_message": result.message if result else None,
            }


def _percentile(ordered: list[float], quantile: float) -> float | None:
    if not ordered:
        return None
    # Nearest rank, as metrics.LatencyWindow does.
    index = max(0, min(len(ordered) - 1, int(round(quantile * len(ordered) + 0.5)) - 1))
    return round(ordered[index], 3)
