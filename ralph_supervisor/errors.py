"""The exception tree of ralph-supervisor.

Every failure a caller can see is one of these. Each carries the facts an
operator needs (exit status, signal, the tail of stderr, partial output,
elapsed time, attempts) as attributes, and its message reads well on one line.

    QChatError
     +-- PromptRejected (also ValueError)   the prompt's fault, never retried
     +-- QChatTimeout                        the deadline passed
     +-- QChatProcessError                   non-zero exit or killed by a signal
     +-- QChatThrottled                      the service said "slow down"
     +-- QChatAuthError                      login missing or expired
     +-- QChatServiceError                   the service is unwell
     +-- OutputTooLarge                      resources.max_output_size passed
     +-- MemoryLimitExceeded                 resources.max_memory_mb passed
     +-- ConfigError (also ValueError)       bad configuration
     +-- CircuitOpen                         the breaker refused the call
     +-- WorkerLost                          the worker died, retries spent
     +-- QueueFull                           backpressure: the queue is full
     +-- SupervisorClosed                    submit after close began

Errors cross process boundaries (worker to parent) by pickle, so every class
rebuilds itself from its message and its attribute dict (see __reduce__).
"""

from __future__ import annotations

from typing import Any

STDERR_TAIL_CHARS = 2000
PARTIAL_OUTPUT_CHARS = 64 * 1024


def _rebuild(cls: type[QChatError], message: str, fields: dict[str, Any]) -> QChatError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(fields)
    return error


class QChatError(Exception):
    """The base of every error ralph-supervisor raises on purpose."""

    # What the error type is called in metrics, logs and exit-code tables.
    kind = "error"

    # Whether a later attempt may succeed, and whether the failure says the
    # service (rather than the prompt) is unwell. The policy layer reads
    # these; it never matches on class names.
    retryable = False
    trips_breaker = False

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
        stderr: str = "",
        output: str = "",
        elapsed: float | None = None,
        attempts: int = 1,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.signal = signal
        self.stderr_tail = stderr[-STDERR_TAIL_CHARS:]
        self.partial_output = output[:PARTIAL_OUTPUT_CHARS]
        self.elapsed = elapsed
        self.attempts = attempts
        for name, value in extra.items():
            setattr(self, name, value)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        text = self.message
        if self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


class PromptRejected(QChatError, ValueError):
    """The prompt cannot be sent: empty, too long, not UTF-8, or blocked."""

    kind = "prompt_rejected"


class QChatTimeout(QChatError):
    """The call's deadline passed; partial_output holds what had arrived."""

    kind = "timeout"
    retryable = True
    trips_breaker = True


class QChatProcessError(QChatError):
    """The agent exited non-zero or was killed by a signal."""

    kind = "process_error"
    retryable = True
    trips_breaker = True


class QChatThrottled(QChatError):
    """The service refused for quota or rate reasons (q still exits 0)."""

    kind = "throttled"
    retryable = True
    trips_breaker = True


class QChatAuthError(QChatError):
    """The agent is not logged in, or its login expired: a person must act."""

    kind = "auth_error"
    trips_breaker = True


class QChatServiceError(QChatError):
    """The service answered that it is unwell."""

    kind = "service_error"
    retryable = True
    trips_breaker = True


class OutputTooLarge(QChatError):
    """stdout and stderr together passed resources.max_output_size."""

    kind = "output_too_large"


class MemoryLimitExceeded(QChatError):
    """The agent's process tree passed resources.max_memory_mb resident."""

    kind = "memory_limit"


class ConfigError(QChatError, ValueError):
    """Bad configuration. The message names the source, the key and the problem.

    `problems` lists every problem found, one line each, when there were
    several (`config validate` prints them all).
    """

    kind = "config_error"

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message, problems=list(problems or [message]))


class CircuitOpen(QChatError):
    """The breaker is open: no process was started and no queue slot taken.

    `retry_at` is the wall-clock time (epoch seconds) of the next trial call,
    or None when a trial is in progress right now.
    """

    kind = "circuit_open"


class WorkerLost(QChatError):
    """The worker running the call died on every attempt."""

    kind = "worker_lost"
    retryable = True


class QueueFull(QChatError):
    """supervisor.queue_size calls are already waiting."""

    kind = "queue_full"


class SupervisorClosed(QChatError):
    """The supervisor is closing or closed and takes no more calls."""

    kind = "supervisor_closed"


ALL_ERRORS: tuple[type[QChatError], ...] = (
    QChatError,
    PromptRejected,
    QChatTimeout,
    QChatProcessError,
    QChatThrottled,
    QChatAuthError,
    QChatServiceError,
    OutputTooLarge,
    MemoryLimitExceeded,
    ConfigError,
    CircuitOpen,
    WorkerLost,
    QueueFull,
    SupervisorClosed,
)
