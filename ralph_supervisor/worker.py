"""The worker process: takes calls from its pipe and runs them with the runner.

    parent (supervisor loop)                 worker (this module)
        | ("run", request_id, CallSpec) -->    run_call(spec)
        | <-- ("started", request_id, pgid)      agent spawned in its own group
        | <-- ("log", record)                    log records, for the parent to write
        | <-- ("done", request_id, outcome)      Response or QChatError
        | ("stop",) -->                          exit between calls

A worker runs one call at a time. If it is stopped (SIGUSR2 from the
parent, or SIGTERM once the supervisor is gone) the runner's cleanup kills
the agent's process group. If it is killed outright, the parent kills that
group when it sees the worker die: by the pgid the worker reported, or, if
the worker died before reporting it, by the request id every agent carries
in its environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from ralph_supervisor.errors import QChatError, QChatProcessError
from ralph_supervisor.logs import setup_worker_logging
from ralph_supervisor.runner import CallSpec, run_call

_PR_SET_PDEATHSIG = 1

# How the supervisor tells a worker to exit now, killing its agent.
STOP_SIGNAL = signal.SIGUSR2

_parent_at_start = 0

log = logging.getLogger("ralph_supervisor.worker")


def worker_main(conn: Connection, slot: int, log_level: int) -> None:
    """Entry point of a worker process (started by the supervisor)."""
    _prepare_process(conn, log_level)
    conn.send(("ready", os.getpid()))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            # The parent is gone: there is no one to answer.
            return

        if message[0] == "stop":
            return
        if message[0] == "run":
            _serve(conn, message[1], message[2])


def _prepare_process(conn: Connection, log_level: int) -> None:
    # Ctrl-C on a terminal reaches the whole foreground group; the parent
    # decides how to stop, and a worker must finish or be told. A handler
    # that does nothing, not SIG_IGN: an ignored signal stays ignored across
    # exec, and the agents this worker starts should get the defaults.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, _ignore)
    signal.signal(signal.SIGTERM, _exit_if_orphaned)
    signal.signal(STOP_SIGNAL, _exit_now)

    # When the parent dies without a word (SIGKILL, OOM), this worker must
    # not run on. With the forkserver start method our parent is the fork
    # server, which exits as soon as the supervisor does.
    libc = ctypes.CDLL(None, use_errno=True)
    global _parent_at_start
    _parent_at_start = os.getppid()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:
        sys.exit(0)

    # The fork server hands every child a copy of the write end of its
    # "alive" pipe and exits only when all copies are closed. A worker that
    # kept its copy would keep the fork server alive after the supervisor
    # died, and the fork server would keep this worker alive in turn.
    _close_forkserver_alive_fd()

    # Only the parent writes the log file: several processes rotating one
    # file would corrupt it.
    def send(record: dict[str, Any]) -> None:
        conn.send(("log", record))

    setup_worker_logging(send, log_level)


def _close_forkserver_alive_fd() -> None:
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(alive_fd)
        server._forkserver_alive_fd = None


def _ignore(signum: int, frame: Any) -> None:
    pass


def _exit_now(signum: int, frame: Any) -> None:
    # SystemExit unwinds through run_call, whose finally kills the agent's
    # process group: stopping a worker never leaves its agent running.
    raise SystemExit(0)


def _exit_if_orphaned(signum: int, frame: Any) -> None:
    """SIGTERM: exit only if the fork server, and so the supervisor, is gone.

    A SIGTERM to the whole process group (supervisord's stopasgroup, a
    terminal, `kill -TERM -PGID`) must not cut the call in flight: the
    supervisor drains and then stops its workers with STOP_SIGNAL. The
    kernel's PR_SET_PDEATHSIG also sends SIGTERM, when the fork server has
    died: then our parent has changed and there is no one left to drain for.
    """
    if os.getppid() != _parent_at_start:
        raise SystemExit(0)


def _serve(conn: Connection, request_id: str, spec: CallSpec) -> None:
    def report_spawn(pgid: int) -> None:
        conn.send(("started", request_id, pgid))

    outcome: Any
    try:
        outcome = run_call(spec, on_spawn=report_spawn)
    except QChatError as error:
        outcome = error
    except Exception as error:
        # A bug of ours must still answer the request, never strand it.
        log.exception("worker failed running request %s", request_id)
        outcome = QChatProcessError(f"internal error in worker: {error!r}")
        outcome.retryable = False

    with contextlib.suppress(OSError, EOFError):
        conn.send(("done", request_id, outcome))
