"""The supervisor: a pool of worker processes, one queue, and the policy.

    submit() (any thread)                         supervisor loop (one thread)
      validate, cache lookup, single-flight         waits at once on:
      breaker fast-fail, queue bound                  - each worker's pipe (results)
      -> inbox + wake byte  ------------------->      - each worker's sentinel (deaths)
                                                      - the wake pipe (submits, signals)
                                                    with a timeout = the next timer
                                                    (retry backoff, rate-limit turn,
                                                    restart backoff, deadlines, hangs)

    dispatch: FIFO queue -> breaker.admit -> rate limit -> idle worker
    outcome:  breaker.record -> retry (backoff + jitter, one deadline) or
              resolve the future (and its single-flight joiners); cache store

Only the loop thread touches workers, the queue and requests; submit()
hands over through a locked inbox. Nothing polls with sleeps: a result, a
death or a signal wakes the loop at once.

Workers are started with the "forkserver" method: the parent runs threads
(this loop, the health server, callers), and forking a threaded process can
leave a lock held forever in the child (logging's among them). The fork
server is a clean single-threaded process that forks workers quickly.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ralph_supervisor import worker as worker_module
from ralph_supervisor.errors import (
    CircuitOpen,
    PromptRejected,
    QChatError,
    QChatTimeout,
    QueueFull,
    SupervisorClosed,
    WorkerLost,
)
from ralph_supervisor.logs import NAMESPACE, handle_forwarded
from ralph_supervisor.policy import AgentGuard, AgentSet, CallPlan
from ralph_supervisor.runner import Response, kill_agents_of

log = logging.getLogger("ralph_supervisor.supervisor")

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["ralph_supervisor.forkserver_init"])

# How often worker memory is sampled, for metrics and for recycling at
# supervisor.max_worker_memory_mb.
WORKER_SAMPLE_INTERVAL = 2.0

# What _start_attempt says when the rate limit made a request wait.
RATE_LIMITED = "rate-limited"

# Slot states.
STARTING, IDLE, BUSY, STOPPING, DEAD = "starting", "idle", "busy", "stopping", "dead"


@dataclass
class _Request:
    plan: CallPlan
    future: Future[Response]
    order: list[AgentGuard]
    submitted_at: float = field(default_factory=time.monotonic)
    attempts: int = 0
    position: int = 0  # which agent of `order` the call is on
    agent_attempts: int = 0  # attempts on that agent
    guard: AgentGuard | None = None  # the agent of the attempt in flight
    ticket: Any = None
    last_error: QChatError | None = None
    dispatched_at: float | None = None
    attempt_deadline: float | None = None
    done: bool = False

    @property
    def id(self) -> str:
        return self.plan.request_id


@dataclass
class _Slot:
    """One place in the pool, and the worker process that fills it."""

    index: int
    process: Any = None
    conn: Any = None
    state: str = DEAD
    pid: int | None = None
    request: _Request | None = None
    agent_pgid: int | None = None
    served: int = 0
    served_limit: int | None = None
    restarts: int = 0
    consecutive_crashes: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    retiring: bool = False
    memory_bytes: int | None = None


class Supervisor:
    """A pool of worker processes running agent calls, with the call policy.

    Use as a context manager: entering starts the workers, leaving closes.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        state_dir: str | Path | None = None,
        workdir: str | None = None,
        metrics: Any = None,
        reload_config: Callable[[], Any] | None = None,
    ) -> None:
        if config is None:
            from ralph_supervisor.config import load_config

            config = load_config()

        self.config = config
        self.state_dir = Path(state_dir) if state_dir else config.state_dir_for(workdir)
        self.metrics = metrics
        self._reload_config = reload_config
        self.agents = AgentSet(config, self.state_dir, with_cache=True)
        if metrics is not None:
            for guard in self.agents.guards:
                guard.breaker.on_transition = self._on_breaker_transition

        self._lock = threading.Lock()
        self._inbox: collections.deque[_Request] = collections.deque()
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_count = 0  # inbox + queue + waiting timers; under _lock
        self._inflight: dict[str, list[Future[Response]]] = {}  # cache key -> joiners
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._slots: list[_Slot] = []
        self._recent_restarts: collections.deque[float] = collections.deque()
        self._signals: collections.deque[int] = collections.deque()
        # Work other threads hand to the loop (operator actions).
        self._actions: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

        self._thread: threading.Thread | None = None
        self._started = False
        self._closing = False
        self._stopping_now = False
        self._drain_deadline: float | None = None
        self._closed = threading.Event()
        self._workers_ready = threading.Event()
        self.intensity_exceeded = False
        self.stop_requested = threading.Event()
        self.last_dump: Path | None = None

        self.counters = collections.Counter[str]()
        self.agent_counters: collections.defaultdict[str, dict[str, float]] = (
            collections.defaultdict(lambda: collections.defaultdict(float))
        )

    # -- life ---------------------------------------------------------------

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, *, wait_ready: float | None = 30.0) -> None:
        """Start the workers and the supervisor loop."""
        if self._started:
            return
        self._started = True
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

        for index in range(self.config.performance.max_concurrent):
            slot = _Slot(index)
            self._slots.append(slot)
            self._spawn(slot)

        self._schedule(WORKER_SAMPLE_INTERVAL, self._sample_workers)
        self._thread = threading.Thread(
            target=self._run_loop, name="ralph-supervisor-loop", daemon=True
        )
        self._thread.start()
        if wait_ready:
            self._workers_ready.wait(wait_ready)

    def close(self, drain_timeout: float | None = None) -> None:
        """Stop taking calls, drain the calls in flight, stop every process.

        Queued calls that have not started fail with SupervisorClosed. Calls
        in flight get drain_timeout (supervisor.drain_timeout by default) to
        finish; then their workers and agents are stopped.
        """
        if drain_timeout is None:
            drain_timeout = self.config.supervisor.drain_timeout
        with self._lock:
            if not self._closing:
                self._closing = True
                self._drain_deadline = time.monotonic() + drain_timeout
        self._wake()

        if self._thread is None:
            self._closed.set()
            return
        if self._thread is not threading.current_thread():
            self._thread.join()

    def stop_now(self) -> None:
        """Close without draining: calls in flight fail with SupervisorClosed."""
        with self._lock:
            self._closing = True
            self._stopping_now = True
            self._drain_deadline = time.monotonic()
        self._wake()

    @property
    def is_closing(self) -> bool:
        return self._closing

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._closed.wait(timeout)

    @property
    def guard(self) -> AgentGuard:
        """The first agent: the only one without an `agents:` list."""
        return self.agents.primary

    # -- submitting ---------------------------------------------------------

    def submit(
        self,
        prompt: str,
        *,
        cwd: str | None = None,
        timeout: float | None = None,
        use_cache: bool | None = None,
    ) -> Future[Response]:
        """Queue one call; the Future resolves to a Response or a typed error."""
        if self._closing or not self._started:
            raise SupervisorClosed(
                "the supervisor is closed" if self._started else "the supervisor is not started"
            )

        future: Future[Response] = Future()
        future.set_running_or_notify_cancel()
        if use_cache is None:
            use_cache = True

        try:
            plan = self.agents.plan(prompt, cwd=cwd, timeout=timeout, use_cache=use_cache)
        except PromptRejected as error:
            self._count("failed")
            future.set_exception(error)
            return future

        # The breakers refuse before any queue slot is taken.
        order = self.agents.order()
        first = self.agents.first_available(order)
        if first is None:
            self._count("failed")
            future.set_exception(self.agents.all_open(order))
            return future

        # The answer of the agent that would take the call now.
        plan.cache_key = first.cache_key(plan)
        cache = self.agents.cache
        if plan.cache_key is not None and cache is not None:
            # Never block the caller, even for another host's call in flight.
            cached = cache.get(plan.cache_key, wait=False)
            if cached is not None:
                self._record_cache(hit=True)
                self._count("completed")
                future.set_result(cached.as_hit(plan.request_id))
                return future
            self._record_cache(hit=False)

        request = _Request(plan, future, order)
        with self._lock:
            if self._closing:
                raise SupervisorClosed("the supervisor is closing")

            if plan.cache_key is not None:
                joiners = self._inflight.get(plan.cache_key)
                if joiners is not None:
                    joiners.append(future)
                    return future
                self._inflight[plan.cache_key] = []

            if self._queued_count >= self.config.supervisor.queue_size:
                if plan.cache_key is not None:
                    self._inflight.pop(plan.cache_key, None)
                raise QueueFull(f"{self._queued_count} calls are waiting (supervisor.queue_size)")
            self._queued_count += 1
            self._inbox.append(request)

        self._wake()
        return future

    def execute(
        self,
        prompt: str,
        *,
        cwd: str | None = None,
        timeout: float | None = None,
        use_cache: bool | None = None,
    ) -> Response:
        """submit() and wait for the answer."""
        return self.submit(prompt, cwd=cwd, timeout=timeout, use_cache=use_cache).result()

    # -- signals ------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Route SIGTERM, SIGINT, SIGHUP and SIGUSR1 to the supervisor loop.

        The handlers only record the signal and write one wake-up byte: a
        handler that logs or takes a lock can deadlock the process.
        """
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    # -- the loop -----------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            while not self._loop_once():
                pass
        except Exception:
            log.critical("supervisor loop failed; stopping every worker", exc_info=True)
            self._stopping_now = True
            self._closing = True
        finally:
            self._shut_down()

    def _loop_once(self) -> bool:
        """One turn of the loop; True when the supervisor has finished."""
        waitables: list[Any] = [self._wake_r]
        for slot in self._slots:
            if slot.process is not None:
                waitables.append(slot.process.sentinel)
                if slot.conn is not None:
                    waitables.append(slot.conn)

        timeout = self._next_timer_in()
        ready = multiprocessing.connection.wait(waitables, timeout)

        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        self._handle_signals()

        for slot in list(self._slots):
            if slot.conn is not None and slot.conn in ready:
                self._receive(slot)
        for slot in list(self._slots):
            if slot.process is not None and slot.process.sentinel in ready:
                self._on_worker_exit(slot)

        self._run_timers()
        self._take_inbox()
        self._dispatch()
        self._check_hung()

        if self._closing:
            return self._advance_close()
        return False

    def _next_timer_in(self) -> float | None:
        moments = []
        if self._timers:
            moments.append(self._timers[0][0])
        for slot in self._slots:
            if slot.state == BUSY and slot.request is not None:
                moments.append(self._hang_deadline(slot.request))
        if self._closing and self._drain_deadline is not None:
            moments.append(self._drain_deadline)
        if not moments:
            return None
        return max(0.0, min(moments) - time.monotonic())

    def _schedule(self, delay: float, action: Callable[[], None]) -> None:
        when = time.monotonic() + delay
        heapq.heappush(self._timers, (when, next(self._timer_seq), action))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, action = heapq.heappop(self._timers)
            action()

    def _take_inbox(self) -> None:
        with self._lock:
            while self._inbox:
                request = self._inbox.popleft()
                self._queue.append(request)
                self._schedule_expiry(request)

    def _schedule_expiry(self, request: _Request) -> None:
        def expire() -> None:
            if request.done or request.dispatched_at is not None:
                return
            self._fail(
                request,
                request.last_error
                or QChatTimeout("the deadline passed while the call waited in the queue"),
            )

        self._schedule(max(0.0, request.plan.deadline - time.monotonic()), expire)

    # -- dispatch -----------------------------------------------------------

    def _dispatch(self) -> None:
        if self._closing:
            return

        while self._queue:
            slot = self._idle_slot()
            if slot is None:
                return
            request = self._queue.popleft()
            if request.done:
                continue
            if self._start_attempt(request, slot) == RATE_LIMITED:
                # The bucket is empty: the requests behind wait for their
                # turn too; asking again for each costs a store round trip.
                return

    def _idle_slot(self) -> _Slot | None:
        for slot in self._slots:
            if slot.state == IDLE and not slot.retiring and slot.conn is not None:
                return slot
        return None

    def _start_attempt(self, request: _Request, slot: _Slot) -> str | None:
        """Send one attempt to the slot's worker; RATE_LIMITED if it must wait."""
        now = time.monotonic()
        if now >= request.plan.deadline:
            self._fail(request, request.last_error or QChatTimeout("the deadline passed"))
            return None

        guard = self._admit(request, now)
        if guard is None:
            return None

        wait = guard.limiter.reserve()
        if wait > 0:
            # Not our turn under limits.requests_per_minute: hand the trial
            # ticket back and ask again when a token is due.
            guard.breaker.release(request.ticket)
            request.ticket = None
            if now + wait >= request.plan.deadline:
                self._fail(
                    request,
                    QChatTimeout(
                        "no call slot under limits.requests_per_minute before the deadline"
                    ),
                )
                return RATE_LIMITED
            self._record_ratelimit_wait(guard, wait)
            self._schedule(wait, lambda: self._requeue(request, front=True))
            return RATE_LIMITED

        request.attempts += 1
        request.agent_attempts += 1
        request.guard = guard
        request.dispatched_at = now
        spec = guard.spec(request.plan)
        request.attempt_deadline = spec.deadline
        slot.state = BUSY
        slot.request = request
        slot.agent_pgid = None
        try:
            slot.conn.send(("run", request.id, spec))
        except (OSError, ValueError):
            # The worker died under us; its sentinel will say so, and the
            # death handling retries the request.
            log.warning("worker %s did not take request %s", slot.pid, request.id)
        self._set_active()
        return None

    def _admit(self, request: _Request, now: float) -> AgentGuard | None:
        """The agent for this attempt, with its breaker's ticket; None: failed.

        Agents whose breaker refuses are passed over, in order.
        """
        while request.position < len(request.order):
            guard = request.order[request.position]
            try:
                request.ticket = guard.breaker.admit(lease_seconds=request.plan.deadline - now)
            except CircuitOpen:
                request.position += 1
                request.agent_attempts = 0
                continue
            return guard

        self._fail(request, request.last_error or self.agents.all_open(request.order))
        return None

    def _requeue(self, request: _Request, *, front: bool = False) -> None:
        if request.done:
            return
        request.dispatched_at = None
        if self._closing:
            self._fail(request, SupervisorClosed("the supervisor closed before a retry"))
            return
        if front:
            self._queue.appendleft(request)
        else:
            self._queue.append(request)

    # -- results ------------------------------------------------------------

    def _receive(self, slot: _Slot) -> None:
        while slot.conn is not None:
            try:
                if not slot.conn.poll():
                    return
                message = slot.conn.recv()
            except (EOFError, OSError):
                # The sentinel reports the death (the fork server may take a
                # moment to reap it); until then no call goes to this slot,
                # since _idle_slot wants a pipe. The state stays as it was:
                # the death handling reads it to tell a crash from a stop.
                slot.conn = None
                return
            self._handle_message(slot, message)

    def _handle_message(self, slot: _Slot, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            slot.pid = message[1]
            if slot.state == STARTING:
                slot.state = IDLE
                if slot.retiring:
                    # The pool shrank while this worker was starting.
                    self._retire(slot)
            if all(s.state != STARTING for s in self._slots):
                self._workers_ready.set()
        elif kind == "started":
            if slot.request is not None and slot.request.id == message[1]:
                slot.agent_pgid = message[2]
        elif kind == "log":
            handle_forwarded(message[1])
        elif kind == "done":
            self._on_done(slot, message[1], message[2])

    def _on_done(self, slot: _Slot, request_id: str, outcome: Any) -> None:
        request = slot.request
        if request is None or request.id != request_id:
            log.warning("worker %s answered unknown request %s", slot.pid, request_id)
            return

        slot.request = None
        slot.agent_pgid = None
        slot.state = IDLE
        slot.served += 1
        slot.consecutive_crashes = 0
        self._set_active()

        guard = request.guard
        assert guard is not None
        if isinstance(outcome, Response):
            guard.breaker.record(request.ticket, None)
            self._succeed(request, outcome)
        else:
            guard.breaker.record(request.ticket, outcome)
            self.agents.on_failure(guard, outcome)
            self._after_failure(request, outcome)

        if slot.retiring:
            self._retire(slot)
        elif slot.served_limit is not None and slot.served >= slot.served_limit:
            log.info(
                "recycling worker %s after %d calls (supervisor.max_requests_per_worker)",
                slot.pid,
                slot.served,
            )
            self._retire(slot)

    def _after_failure(self, request: _Request, error: QChatError) -> None:
        """Retry on the same agent, move on to the next, or fail the call."""
        request.last_error = error
        request.ticket = None
        guard = request.guard
        if self._closing or guard is None:
            self._fail(request, error)
            return

        delay = guard.backoff(request.agent_attempts)
        in_time = time.monotonic() + delay < request.plan.deadline
        if guard.may_retry(error, request.agent_attempts) and in_time:
            self._retry_later(request, guard, error, delay)
            return

        moving_on = self.agents.should_fail_over(error, request.position, request.order)
        if moving_on and time.monotonic() < request.plan.deadline:
            self._fail_over(request, guard, error)
            return

        self._fail(request, error)

    def _retry_later(
        self, request: _Request, guard: AgentGuard, error: QChatError, delay: float
    ) -> None:
        log.info(
            "retrying request %s on %s in %.2f s after %s (attempt %d of %d)",
            request.id,
            guard.name,
            delay,
            error.kind,
            request.agent_attempts,
            guard.config.adapter.max_retries + 1,
            extra={"request_id": request.id, "error_type": error.kind, "agent": guard.name},
        )
        self._count("retries")
        if self.metrics is not None:
            self.metrics.retried(guard.name)
        request.dispatched_at = None
        self._schedule(delay, lambda: self._requeue(request, front=True))

    def _fail_over(self, request: _Request, guard: AgentGuard, error: QChatError) -> None:
        following = request.order[request.position + 1]
        log.warning(
            "request %s moves from %s to %s after %s",
            request.id,
            guard.name,
            following.name,
            error.kind,
            extra={"request_id": request.id, "error_type": error.kind, "agent": guard.name},
        )
        self._count("failovers")
        request.position += 1
        request.agent_attempts = 0
        request.dispatched_at = None
        self._requeue(request, front=True)

    def _succeed(self, request: _Request, response: Response) -> None:
        response.attempts = request.attempts
        response.request_id = request.id
        # Stored under the key of the agent that answered.
        guard = request.guard
        key = guard.cache_key(request.plan) if guard is not None else None
        cache = self.agents.cache
        if key is not None and cache is not None:
            cache.put(key, response)
        if cache is not None and request.plan.cache_key not in (None, key):
            cache.abandon(str(request.plan.cache_key))
        self._observe(request, "success", None)
        self._count("completed")
        self._resolve(request, response, None)

    def _fail(self, request: _Request, error: QChatError) -> None:
        if request.done:
            return
        error.attempts = max(request.attempts, 1)
        if request.ticket is not None and request.guard is not None:
            request.guard.breaker.release(request.ticket)
            request.ticket = None
        self._observe(request, "error", error.kind)
        self._count("failed")
        if request.plan.cache_key is not None and self.agents.cache is not None:
            # Hosts waiting on this call's answer make the call themselves.
            self.agents.cache.abandon(request.plan.cache_key)
        self._resolve(request, None, error)

    def _resolve(
        self, request: _Request, response: Response | None, error: QChatError | None
    ) -> None:
        request.done = True
        with self._lock:
            self._queued_count -= 1
            joiners = []
            if request.plan.cache_key is not None:
                joiners = self._inflight.pop(request.plan.cache_key, [])

        for future in [request.future, *joiners]:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                assert response is not None
                shared = response if future is request.future else response.copy()
                future.set_result(shared)

    # -- workers ------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        parent_conn, child_conn = _CONTEXT.Pipe(duplex=True)
        process = _CONTEXT.Process(
            target=worker_module.worker_main,
            args=(child_conn, slot.index, logging.getLogger(NAMESPACE).getEffectiveLevel()),
            name=f"ralph-worker-{slot.index}",
            daemon=True,
        )
        process.start()
        child_conn.close()

        slot.process = process
        slot.conn = parent_conn
        slot.pid = process.pid
        slot.state = STARTING
        slot.request = None
        slot.agent_pgid = None
        slot.served = 0
        slot.retiring = False
        slot.started_at = time.monotonic()
        slot.restart_at = None
        slot.served_limit = self._served_limit()
        log.debug("started worker %s in slot %d", process.pid, slot.index)

    def _served_limit(self) -> int | None:
        limit = self.config.supervisor.max_requests_per_worker
        if limit is None:
            return None
        # Jitter, so that workers started together are not recycled together.
        return max(1, int(limit * random.uniform(0.9, 1.1)))

    def _retire(self, slot: _Slot) -> None:
        slot.retiring = True
        if slot.state == IDLE and slot.conn is not None:
            slot.state = STOPPING
            with contextlib.suppress(OSError, ValueError):
                slot.conn.send(("stop",))

    def _on_worker_exit(self, slot: _Slot) -> None:
        process = slot.process
        process.join(0)
        exitcode = process.exitcode
        request = slot.request
        was_planned = slot.state == STOPPING or self._closing

        # The agent runs in its own process group and outlives its worker:
        # kill that group before the request runs anywhere else.
        group_known = slot.agent_pgid is not None
        self._kill_agent_group(slot)
        if request is not None and request.dispatched_at is not None and not group_known:
            # The worker may have died between starting the agent and
            # naming its group: find it by the request id it carries.
            kill_agents_of(request.id)
        with contextlib.suppress(Exception):
            if slot.conn is not None:
                slot.conn.close()
            process.close()
        slot.process = None
        slot.conn = None
        slot.request = None
        slot.state = DEAD
        self._set_active()

        if request is not None:
            self._on_request_lost(request, slot.pid, exitcode)

        if slot.index >= self.config.performance.max_concurrent:
            # The pool shrank (SIGHUP): this slot goes away with its worker.
            self._slots.remove(slot)
            return
        if was_planned and not self._closing:
            self._spawn(slot)
            return
        if self._closing:
            return

        reason = _describe_exit(exitcode)
        log.error(
            "worker %s in slot %d died (%s)%s",
            slot.pid,
            slot.index,
            reason,
            "; out of memory?" if exitcode == -signal.SIGKILL else "",
            extra={"worker_pid": slot.pid, "exit_code": exitcode},
        )
        self._schedule_restart(slot)

    def _sample_workers(self) -> None:
        import psutil

        limit_mb = self.config.supervisor.max_worker_memory_mb
        for slot in self._slots:
            if slot.process is None or slot.pid is None:
                continue
            try:
                slot.memory_bytes = psutil.Process(slot.pid).memory_info().rss
            except psutil.Error:
                slot.memory_bytes = None
                continue
            if self.metrics is not None:
                self.metrics.worker_memory(str(slot.index), slot.memory_bytes)

            too_big = limit_mb is not None and slot.memory_bytes > limit_mb * 1024 * 1024
            if too_big and not slot.retiring:
                log.warning(
                    "recycling worker %s: %d MB resident, over supervisor.max_worker_memory_mb",
                    slot.pid,
                    slot.memory_bytes // (1024 * 1024),
                )
                self._retire(slot)

        # Another process sharing the state directory may have moved a
        # breaker; the gauge follows the shared state, not our own moves.
        if self.metrics is not None:
            for guard in self.agents.guards:
                self.metrics.breaker_state(guard.name, guard.breaker.state)

        if not self._closing:
            self._schedule(WORKER_SAMPLE_INTERVAL, self._sample_workers)

    def _on_breaker_transition(self, name: str, old: str, new: str) -> None:
        if self.metrics is not None:
            self.metrics.breaker_transition(name, new)

    def _kill_agent_group(self, slot: _Slot) -> None:
        if slot.agent_pgid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(slot.agent_pgid, signal.SIGKILL)
        slot.agent_pgid = None

    def _on_request_lost(self, request: _Request, pid: int | None, exitcode: int | None) -> None:
        self._release_ticket(request)
        if time.monotonic() >= request.plan.deadline:
            error: QChatError = QChatTimeout(
                f"the worker {pid} running the call was stopped past its deadline"
            )
        else:
            error = WorkerLost(
                f"worker {pid} died ({_describe_exit(exitcode)}) during request {request.id}",
                exit_code=exitcode,
            )
        self._after_failure(request, error)

    def _release_ticket(self, request: _Request) -> None:
        # A worker's death says nothing about the service: free the trial.
        if request.ticket is not None and request.guard is not None:
            request.guard.breaker.release(request.ticket)
            request.ticket = None

    def _schedule_restart(self, slot: _Slot) -> None:
        now = time.monotonic()
        period = self.config.supervisor.restart_period
        self._recent_restarts.append(now)
        while self._recent_restarts and self._recent_restarts[0] < now - period:
            self._recent_restarts.popleft()

        slot.consecutive_crashes += 1
        slot.restarts += 1
        self._count("worker_restarts")
        if self.metrics is not None:
            self.metrics.worker_restarted()

        delay = self._restart_backoff(slot.consecutive_crashes)
        if len(self._recent_restarts) > self.config.supervisor.max_restarts:
            # Past the restart intensity: say so loudly and wait for the
            # window to clear instead of spinning.
            if not self.intensity_exceeded:
                log.critical(
                    "workers restarted %d times within %.0f s (supervisor.max_restarts=%d); "
                    "the supervisor is unhealthy and slows restarts until the window clears",
                    len(self._recent_restarts),
                    period,
                    self.config.supervisor.max_restarts,
                )
            self.intensity_exceeded = True
            delay = max(delay, self._recent_restarts[0] + period - now)

        slot.restart_at = now + delay

        def restart() -> None:
            if self._closing or slot.state != DEAD:
                return
            self._refresh_intensity()
            self._spawn(slot)

        self._schedule(delay, restart)

    def _restart_backoff(self, crashes: int) -> float:
        settings = self.config.supervisor
        if crashes <= 1:
            return 0.0
        return min(settings.restart_backoff_max, settings.restart_backoff * 2 ** (crashes - 2))

    def _refresh_intensity(self) -> None:
        now = time.monotonic()
        period = self.config.supervisor.restart_period
        while self._recent_restarts and self._recent_restarts[0] < now - period:
            self._recent_restarts.popleft()
        within_limit = len(self._recent_restarts) <= self.config.supervisor.max_restarts
        if self.intensity_exceeded and within_limit:
            log.warning("worker restarts are back under supervisor.max_restarts")
            self.intensity_exceeded = False

    def _hang_deadline(self, request: _Request) -> float:
        grace = self.config.adapter.kill_grace + self.config.supervisor.hang_grace
        return (request.attempt_deadline or request.plan.deadline) + grace

    def _check_hung(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            request = slot.request
            if slot.state != BUSY or request is None or slot.process is None:
                continue
            if now < self._hang_deadline(request):
                continue
            log.error(
                "worker %s still busy with request %s %.1f s past its deadline; killing it "
                "and its agent",
                slot.pid,
                request.id,
                now - request.plan.deadline,
                extra={"worker_pid": slot.pid, "request_id": request.id},
            )
            self._kill_agent_group(slot)
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGKILL)
            slot.state = STOPPING

    # -- signals, reload, close ---------------------------------------------

    def _handle_signals(self) -> None:
        while self._actions:
            self._actions.popleft()()
        while self._signals:
            signum = self._signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._on_stop_signal(signum)
            elif signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR1:
                self.dump_diagnostics()

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self.stop_requested.set()
        if self._closing:
            log.warning("%s again: stopping at once, killing every worker and agent", name)
            self._stopping_now = True
            self._drain_deadline = time.monotonic()
            return
        drain = self.config.supervisor.drain_timeout
        log.info("%s: draining calls in flight (up to %.0f s), then stopping", name, drain)
        self._closing = True
        self._drain_deadline = time.monotonic() + drain

    def reload(self) -> None:
        """Reload the configuration, as SIGHUP does, from the supervisor loop."""
        self._signals.append(signal.SIGHUP)
        self._wake()

    def restart_worker(self, slot_index: int) -> bool:
        """Replace one worker (an operator's action) once its call finishes.

        False when there is no such slot. The worker finishes the call in
        flight first: an operator's restart never costs a call.
        """
        if not 0 <= slot_index < len(self._slots):
            return False
        self._actions.append(lambda: self._recycle(slot_index))
        self._wake()
        return True

    def _recycle(self, slot_index: int) -> None:
        if slot_index >= len(self._slots):
            return
        slot = self._slots[slot_index]
        log.info("restarting worker %s in slot %d at an operator's request", slot.pid, slot_index)
        # An idle worker stops now; a busy one once its call is answered.
        self._retire(slot)

    def _reload(self) -> None:
        """Apply a new configuration without dropping a call in flight."""
        if self._reload_config is None:
            from ralph_supervisor.config import load_config

            path = self.config.path

            def default_reload() -> Any:
                return load_config(path)

            reload_fn: Callable[[], Any] = default_reload
        else:
            reload_fn = self._reload_config

        try:
            new = reload_fn()
        except QChatError as error:
            log.error("configuration reload failed; keeping the old one: %s", error)
            return

        old_size = len(self._slots)
        self.config = new
        self.agents.apply(new)
        logging.getLogger("ralph_supervisor").setLevel(new.logging.level)
        self._resize(new.performance.max_concurrent)
        log.info(
            "configuration reloaded from %s: %d workers (was %d)",
            new.path or "the environment",
            new.performance.max_concurrent,
            old_size,
        )

    def _resize(self, size: int) -> None:
        while len(self._slots) < size:
            slot = _Slot(len(self._slots))
            self._slots.append(slot)
            self._spawn(slot)

        # Shrinking retires the highest slots once their calls finish.
        for slot in self._slots[size:]:
            slot.retiring = True
            if slot.state == IDLE:
                self._retire(slot)
        self._slots = [s for s in self._slots if s.index < size or s.process is not None]

    def _advance_close(self) -> bool:
        """Drain, then stop; True once nothing is left to wait for."""
        self._fail_waiting()

        busy = any(s.state == BUSY for s in self._slots)
        draining = not self._stopping_now and time.monotonic() < (self._drain_deadline or 0)
        return not (busy and draining)

    def _fail_waiting(self) -> None:
        """Fail every call not yet running: queued, retrying, or in the inbox."""
        while self._queue:
            request = self._queue.popleft()
            if not request.done:
                self._fail(request, SupervisorClosed("the supervisor closed before the call ran"))

        # Pending retries and restarts: run them now, they see _closing.
        timers, self._timers = self._timers, []
        for _, _, action in timers:
            action()

        with self._lock:
            inbox = list(self._inbox)
            self._inbox.clear()
        for request in inbox:
            self._fail(request, SupervisorClosed("the supervisor closed before the call ran"))

    def _shut_down(self) -> None:
        """Stop every worker and agent: SIGUSR2, a grace, SIGKILL; reap all.

        Also after a crash of the loop: every call still waiting resolves.
        """
        self._closing = True
        with contextlib.suppress(Exception):
            self._fail_waiting()
        for slot in self._slots:
            if slot.request is not None and not slot.request.done:
                stopped = SupervisorClosed("the supervisor stopped during the call")
                self._fail(slot.request, stopped)

        live = [s for s in self._slots if s.process is not None]
        for slot in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, worker_module.STOP_SIGNAL)

        grace_end = time.monotonic() + self.config.adapter.kill_grace
        for slot in live:
            slot.process.join(max(0.0, grace_end - time.monotonic()))
        for slot in live:
            if slot.process.is_alive():
                log.warning("worker %s did not stop; killing it", slot.pid)
                slot.process.kill()
                slot.process.join(5)
            self._kill_agent_group(slot)
            with contextlib.suppress(Exception):
                slot.conn.close()
                slot.process.close()
            slot.process = None
            slot.conn = None
            slot.state = DEAD

        os.close(self._wake_r)
        os.close(self._wake_w)
        self._set_active()
        log.info("supervisor stopped; every worker and agent has exited")
        self._closed.set()

    # -- introspection ------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = []
        for slot in list(self._slots):
            request = slot.request
            workers.append(
                {
                    "slot": slot.index,
                    "pid": slot.pid if slot.process is not None else None,
                    "state": slot.state,
                    "requests": slot.served,
                    "restarts": slot.restarts,
                    "request_id": request.id if request else None,
                    "request_age_s": round(now - request.dispatched_at, 3)
                    if request and request.dispatched_at
                    else None,
                    "agent_pgid": slot.agent_pgid,
                    "memory_bytes": slot.memory_bytes,
                }
            )

        cache = self.agents.cache
        cache_stats = cache.stats() if cache is not None else {}
        shared_ok, shared_reason = self.guard.shared.health()
        return {
            "workers": workers,
            "workers_alive": sum(1 for w in workers if w["state"] in (IDLE, BUSY, STARTING)),
            "worker_restarts": self.counters["worker_restarts"],
            "in_flight": sum(1 for w in workers if w["state"] == BUSY),
            "queued": len(self._queue) + len(self._inbox),
            "completed": self.counters["completed"],
            "failed": self.counters["failed"],
            "retries": self.counters["retries"],
            "breaker_state": self.guard.breaker.state,
            "agents": [self._agent_stats(guard) for guard in self.agents.guards],
            "failovers": self.counters["failovers"],
            "cache_hits": self.counters["cache_hits"],
            "cache_misses": self.counters["cache_misses"],
            "cache": cache_stats,
            "intensity_exceeded": self.intensity_exceeded,
            "shared_state": {
                "backend": self.guard.shared.backend,
                "ok": shared_ok,
                "reason": shared_reason,
            },
            "closing": self._closing,
        }

    def dump_diagnostics(self) -> None:
        """Write the SIGUSR1 dump to the log and the state directory.

        The snapshot is taken here, in the loop; the writing (py-spy may take
        seconds per worker) happens in a thread of its own, so the loop goes
        on serving while the dump is written.
        """
        snapshot = self.stats()
        snapshot["queue"] = [
            {"request_id": r.id, "age_s": round(time.monotonic() - r.submitted_at, 3)}
            for r in list(self._queue)[:100]
        ]
        pids = [w["pid"] for w in snapshot["workers"] if w["pid"]]
        writer = threading.Thread(
            target=self._write_dump, args=(snapshot, pids), name="ralph-dump", daemon=True
        )
        writer.start()

    def _write_dump(self, snapshot: dict[str, Any], pids: list[int]) -> None:
        from ralph_supervisor import diagnostics

        try:
            path = diagnostics.write_dump(snapshot, self.state_dir, worker_pids=pids)
        except Exception:
            log.error("diagnostic dump failed", exc_info=True)
            return
        log.warning("diagnostic dump written to %s", path)
        self.last_dump = path

    # -- bookkeeping --------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _record_cache(self, *, hit: bool) -> None:
        self._count("cache_hits" if hit else "cache_misses")
        if self.metrics is not None:
            if hit:
                self.metrics.cache_hit()
            else:
                self.metrics.cache_miss()

    def _record_ratelimit_wait(self, guard: AgentGuard, seconds: float) -> None:
        with self._lock:
            self.agent_counters[guard.name]["ratelimit_wait_s"] += seconds
        if self.metrics is not None:
            self.metrics.ratelimit_waited(guard.name, seconds)

    def _agent_stats(self, guard: AgentGuard) -> dict[str, Any]:
        with self._lock:
            counts = dict(self.agent_counters[guard.name])
        waited = counts.pop("ratelimit_wait_s", 0.0)
        return {
            "name": guard.name,
            "profile": guard.profile.name,
            "breaker": guard.breaker.snapshot(),
            "calls": int(counts.pop("calls", 0)),
            "successes": int(counts.pop("success", 0)),
            "ratelimit_wait_s": round(waited, 3),
            "errors": {kind: int(count) for kind, count in counts.items()},
        }

    def _observe(self, request: _Request, outcome: str, error_type: str | None) -> None:
        agent = request.guard.name if request.guard is not None else self.guard.name
        with self._lock:
            counts = self.agent_counters[agent]
            counts["calls"] += 1
            counts[error_type or outcome] += 1
        if self.metrics is None:
            return
        duration = time.monotonic() - request.submitted_at
        self.metrics.observe_request(agent, outcome, duration, error_type)

    def _set_active(self) -> None:
        if self.metrics is None:
            return
        self.metrics.set_active(sum(1 for s in self._slots if s.state == BUSY))
        self.metrics.workers_alive(sum(1 for s in self._slots if s.state in (IDLE, BUSY)))
        self.metrics.queue_length(len(self._queue))


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"
