"""The circuit breaker: stop calling an agent whose service keeps failing.

    closed --(fail_max counting failures)--> open
      ^                                       |  reset_timeout passes,
      |                                       v  admit() takes the trial lease
      +--(success_threshold trials pass)-- half-open --(the trial fails)--> open

The counting and the state changes are pybreaker's (`CircuitBreaker` with
fail_max, reset_timeout, success_threshold). What this module adds:

- No call runs inside pybreaker's `call()`, which holds a lock for the whole
  call and would serialise every caller. `admit()` checks the state before
  dispatch; `record()` replays the outcome through `call()` afterwards, so
  pybreaker's lock is held for microseconds.
- breaker.storage `disk` keeps the circuit in a diskcache store under
  STATE_DIR/breaker/<name>: every process on the host that shares the state
  directory sees one circuit. Each change runs inside one SQLite transaction.
- half-open admits ONE trial call at a time, across processes, through a
  lease key that expires (a trial whose process died must not hold the
  circuit forever). pybreaker alone lets every caller through.
- With state.backend redis, breaker.storage `disk` means Redis
  (redis_backend.RedisCircuitStorage): one circuit and one trial lease for
  every host. While Redis is away the state directory stands in.
- A state change is logged, counted and reported to `on_transition` once, by
  the process that made it. pybreaker would announce it again in every
  process that later noticed it, and reset the shared failure counter there.

Only errors whose `trips_breaker` is true count as failures. Errors that are
the prompt's fault, or the supervisor's own refusals (CircuitOpen, QueueFull,
SupervisorClosed), neither count nor reset the count.

Usage:

    breaker.check()                 # optional, before queueing: may raise CircuitOpen
    ticket = breaker.admit(lease_seconds=deadline - time.monotonic())
    ...run the call...              # admit() may raise CircuitOpen
    breaker.record(ticket, None)    # or the error the call ended with
    breaker.release(ticket)         # instead of record() when the call never ran

Pass lease_seconds: without it a trial's lease lasts reset_timeout, and a
trial call that runs longer loses it to the next caller.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import diskcache
import pybreaker

from ralph_supervisor.backend import (
    SharedState,
    SharedStateBusy,
    SharedStateError,
    shared_state_at,
    state_dir_key,
)
from ralph_supervisor.cache import (
    STORE_ERRORS,
    is_store_broken,
    open_private_cache,
    reason_here,
)
from ralph_supervisor.errors import CircuitOpen

log = logging.getLogger(__name__)

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

STORAGES = ("memory", "disk")

TransitionHook = Callable[[str, str, str], None]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Keys of the disk store.
_STATE = "state"
_FAILURES = "fail_counter"
_SUCCESSES = "success_counter"
_OPENED_AT = "opened_at"
_TRIAL = "trial"
_TRANSITIONS = "transitions"
_LAST_ERROR_KIND = "last_error_kind"

# Guards building a process's circuit; replaced in a forked child, where a
# lock held by another thread of the parent would never be released.
_build_lock = threading.Lock()


def _renew_build_lock() -> None:
    global _build_lock
    _build_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_build_lock)


@dataclass(frozen=True)
class Ticket:
    """Permission for one call, from admit(); hand it back to record().

    trial: this call is the half-open trial; its outcome decides the circuit.
    """

    breaker: str
    trial: bool
    owner: str | None = None


@dataclass(frozen=True)
class Transition:
    """One change of state, as the process that made it saw it."""

    old: str
    new: str
    fail_count: int
    last_error_kind: str | None
    retry_at: float | None
    by_operator: bool


class _RecordedFailure(Exception):
    """Stands in for a recorded error when it is replayed through pybreaker.

    Replaying the caller's own exception would graft this module's frames
    onto its traceback.
    """

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _replay(error_kind: str | None) -> None:
    if error_kind is not None:
        raise _RecordedFailure(error_kind)


def _epoch_to_datetime(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def _clock_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# Storages: pybreaker's interface, plus the trial lease, the transitions count
# and a critical section around each change.


class MemoryCircuitStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage, for one process, with a trial lease."""

    kind = "memory"

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(CLOSED)
        self._clock = clock
        self._lock = threading.RLock()
        self._opened_epoch: float | None = None
        self._lease: tuple[str, float] | None = None
        self._transitions = 0
        self._last_error_kind: str | None = None

    @property
    def opened_at(self) -> datetime | None:
        return _epoch_to_datetime(self._opened_epoch)

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        # pybreaker passes datetime.now(); the breaker's clock is the same
        # clock in production and an injected one in tests.
        self._opened_epoch = self._clock()

    @property
    def opened_epoch(self) -> float | None:
        return self._opened_epoch

    def critical_section(self) -> contextlib.AbstractContextManager[Any]:
        return self._lock

    def take_lease(self, owner: str, seconds: float) -> bool:
        with self._lock:
            now = self._clock()
            if self._lease is not None and self._lease[1] > now:
                return False
            self._lease = (owner, now + seconds)
            return True

    def lease_holder(self) -> str | None:
        lease = self._lease
        if lease is None or lease[1] <= self._clock():
            return None
        return lease[0]

    def release_lease(self, owner: str | None) -> None:
        with self._lock:
            if self._lease is not None and (owner is None or self._lease[0] == owner):
                self._lease = None

    def count_transition(self) -> None:
        self._transitions += 1

    @property
    def transitions(self) -> int:
        return self._transitions

    @property
    def last_error_kind(self) -> str | None:
        return self._last_error_kind

    @last_error_kind.setter
    def last_error_kind(self, kind: str | None) -> None:
        self._last_error_kind = kind


class DiskCircuitStorage(pybreaker.CircuitBreakerStorage):
    """A circuit kept in a diskcache store, shared by every process using it.

    Open one per process (after fork). Writers take the store's transaction
    through critical_section(); counters use incr(), the trial lease add()
    with an expiry, both atomic across processes.
    """

    kind = "disk"

    def __init__(self, store: diskcache.Cache, clock: Callable[[], float]) -> None:
        super().__init__("disk")
        self._store = store
        self._clock = clock

    @property
    def state(self) -> str:
        return str(self._store.get(_STATE, CLOSED))

    @state.setter
    def state(self, state: str) -> None:
        self._store.set(_STATE, str(state))

    def increment_counter(self) -> None:
        self._store.incr(_FAILURES)

    def reset_counter(self) -> None:
        self._store.set(_FAILURES, 0)

    def increment_success_counter(self) -> None:
        self._store.incr(_SUCCESSES)

    def reset_success_counter(self) -> None:
        self._store.set(_SUCCESSES, 0)

    @property
    def counter(self) -> int:
        return int(self._store.get(_FAILURES, 0))

    @property
    def success_counter(self) -> int:
        return int(self._store.get(_SUCCESSES, 0))

    @property
    def opened_at(self) -> datetime | None:
        return _epoch_to_datetime(self.opened_epoch)

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        # See MemoryCircuitStorage.opened_at: stamped with the breaker's clock.
        self._store.set(_OPENED_AT, self._clock())

    @property
    def opened_epoch(self) -> float | None:
        value = self._store.get(_OPENED_AT)
        return None if value is None else float(value)

    def critical_section(self) -> contextlib.AbstractContextManager[Any]:
        # BEGIN IMMEDIATE: one writer at a time on the host; raises
        # diskcache.Timeout after STORE_TIMEOUT rather than waiting forever.
        return self._store.transact()

    def take_lease(self, owner: str, seconds: float) -> bool:
        return bool(self._store.add(_TRIAL, owner, expire=seconds))

    def lease_holder(self) -> str | None:
        holder = self._store.get(_TRIAL)
        return None if holder is None else str(holder)

    def release_lease(self, owner: str | None) -> None:
        with self._store.transact():
            if owner is None or self._store.get(_TRIAL) == owner:
                self._store.delete(_TRIAL)

    def count_transition(self) -> None:
        self._store.incr(_TRANSITIONS)

    @property
    def transitions(self) -> int:
        return int(self._store.get(_TRANSITIONS, 0))

    @property
    def last_error_kind(self) -> str | None:
        kind = self._store.get(_LAST_ERROR_KIND)
        return None if kind is None else str(kind)

    @last_error_kind.setter
    def last_error_kind(self, kind: str | None) -> None:
        self._store.set(_LAST_ERROR_KIND, kind)


Storage = MemoryCircuitStorage | DiskCircuitStorage


# ---------------------------------------------------------------------------
# pybreaker, made to share


class _SharedCircuit(pybreaker.CircuitBreaker):
    """A pybreaker circuit whose storage other processes also change.

    pybreaker treats a state it finds changed in storage as news: it notifies
    its listeners and, for closed, resets the failure counter. With shared
    storage that would announce each transition once per process and wipe
    failures that others recorded since. Here a state changed elsewhere is
    adopted silently; only the changes this process makes are announced.
    """

    @property
    def state(self) -> Any:
        stored = self.current_state
        if stored != self._state.name:
            with self._lock:
                self._state = self._create_new_state(stored, prev_state=self._state)
        return self._state

    @state.setter
    def state(self, state_str: str) -> None:
        with self._lock:
            self._state = self._create_new_state(state_str, prev_state=self._state, notify=True)


class _TransitionRecorder(pybreaker.CircuitBreakerListener):
    """Collects the transitions made inside one critical section.

    They are announced after the section ends: a hook or a log handler that
    is slow must not hold the store's write lock, and a section that rolls
    back announces nothing.
    """

    def __init__(self, storage: Storage, reset_timeout: float) -> None:
        self.storage = storage
        self.reset_timeout = reset_timeout
        self.collected: list[Transition] = []
        self.by_operator = False

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        if old_state is None or old_state.name == new_state.name:
            return

        storage = self.storage
        storage.count_transition()
        retry_at = None
        if new_state.name == OPEN:
            opened = storage.opened_epoch
            retry_at = None if opened is None else opened + self.reset_timeout
        self.collected.append(
            Transition(
                old=old_state.name,
                new=new_state.name,
                fail_count=storage.counter,
                last_error_kind=storage.last_error_kind,
                retry_at=retry_at,
                by_operator=self.by_operator,
            )
        )


@dataclass
class _Circuit:
    """One process's view of the breaker: storage, pybreaker, recorder."""

    pid: int
    storage: Storage
    breaker: _SharedCircuit
    recorder: _TransitionRecorder
    directory: Path | None = None
    announced: collections.Counter[str] = field(default_factory=collections.Counter)
    # The shared state the storage lives in (state.backend redis), or None.
    shared: SharedState | None = None


# ---------------------------------------------------------------------------
# The breaker


class Breaker:
    """A circuit breaker for one agent, checked before and told after each call.

    `settings` is the breaker section of the configuration, or anything with
    its attributes: enabled, fail_max, reset_timeout, success_threshold,
    storage ("memory" or "disk"). `state_dir` holds the disk store; without
    one the storage is memory. Memory storage is per process: a forked child
    starts with its own closed circuit.

    `on_transition(name, old, new)` is called by the process that made a
    transition, after it is stored; a hook that raises is logged and ignored.

    `state` is what the store says. An open breaker whose reset_timeout has
    passed still reads "open" (with retry_at in the past) until admit() lets
    a trial through: until a call has gone through, nothing shows the service
    is any better, and a health check should not say otherwise.
    """

    def __init__(
        self,
        name: str,
        settings: Any,
        state_dir: Path | None,
        *,
        clock: Callable[[], float] = time.time,
        on_transition: TransitionHook | None = None,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"breaker name {name!r}: use letters, digits, '.', '_' and '-'")
        if settings.storage not in STORAGES:
            raise ValueError(
                f"breaker.storage: expected one of {', '.join(STORAGES)}, got {settings.storage!r}"
            )

        self.name = name
        self.enabled = bool(settings.enabled)
        self.fail_max = int(settings.fail_max)
        self.reset_timeout = float(settings.reset_timeout)
        self.success_threshold = int(settings.success_threshold)
        self.on_transition = on_transition
        self._clock = clock

        self.directory: Path | None = None
        if settings.storage == "disk" and state_dir is not None:
            self.directory = Path(state_dir) / "breaker" / name
        self._state_key = state_dir_key(state_dir)
        self._wants_shared = settings.storage == "disk"

        self._circuit_now: _Circuit | None = None
        self._degraded: tuple[int, str] | None = None

    # -- before and after a call ------------------------------------------

    def admit(self, *, lease_seconds: float | None = None) -> Ticket:
        """Let a call through, or raise CircuitOpen.

        While half-open, the one caller that gets the trial holds a lease for
        `lease_seconds` (pass the call's deadline length; default
        reset_timeout). If its process dies, the lease expires and the next
        caller gets the trial.
        """
        if not self.enabled:
            return Ticket(self.name, trial=False)

        circuit = self._circuit()
        try:
            return self._admit(circuit, lease_seconds)
        except STORE_ERRORS as error:
            # Never refuse a call because the breaker could not read its state.
            self._store_failed(circuit, error, "admit")
            return Ticket(self.name, trial=False)

    def record(self, ticket: Ticket, error: BaseException | None) -> None:
        """Count the outcome of an admitted call: None for a success.

        Only errors with trips_breaker count as failures; other errors do
        nothing, except that a trial ending with one frees the trial for the
        next caller. Outcomes of calls admitted before the circuit opened do
        not count: they say nothing about the service since.
        """
        if not self.enabled:
            return

        counts = error is None or bool(getattr(error, "trips_breaker", False))
        error_kind = None if error is None else str(getattr(error, "kind", type(error).__name__))
        circuit = self._circuit()
        try:
            if not counts:
                if ticket.trial:
                    # A trial that says nothing about the service frees the
                    # trial for the next caller.
                    circuit.storage.release_lease(ticket.owner)
                return
            self._record(circuit, ticket, error_kind)
        except STORE_ERRORS as store_error:
            self._store_failed(circuit, store_error, "record")

    def check(self) -> None:
        """Raise CircuitOpen if admit() would refuse now; take nothing.

        For a caller that refuses work early (before queueing it) and calls
        admit() later, at dispatch.
        """
        if not self.enabled:
            return

        circuit = self._circuit()
        try:
            storage = circuit.storage
            state = storage.state
            if state == OPEN:
                self._refuse_until_due(storage)
            elif state == HALF_OPEN and storage.lease_holder() is not None:
                raise self._trial_in_progress()
        except STORE_ERRORS as error:
            self._store_failed(circuit, error, "check")

    def release(self, ticket: Ticket) -> None:
        """Give back a ticket whose call never ran: no outcome is counted.

        A trial ticket frees the trial for the next caller.
        """
        if not self.enabled or not ticket.trial:
            return

        circuit = self._circuit()
        try:
            circuit.storage.release_lease(ticket.owner)
        except STORE_ERRORS as error:
            self._store_failed(circuit, error, "release")

    # -- what the operator and the health check see -----------------------

    @property
    def state(self) -> str:
        """closed, open or half-open, as the store says."""
        if not self.enabled:
            return CLOSED
        return str(self._read(lambda storage: storage.state, CLOSED))

    @property
    def retry_at(self) -> float | None:
        """Epoch seconds when the next trial may start; None when closed or
        while a trial is in progress."""
        if not self.enabled:
            return None
        return self._read(self._retry_at, None)

    @property
    def fail_count(self) -> int:
        """Counting failures since the last success (or since it opened)."""
        if not self.enabled:
            return 0
        return int(self._read(lambda storage: storage.counter, 0))

    @property
    def degraded_reason(self) -> str | None:
        """Why this process fell back to memory storage, or None."""
        return reason_here(self._degraded)

    def snapshot(self) -> dict[str, Any]:
        """Everything a health check or `status` shows about the breaker.

        transitions counts those of every process sharing the circuit;
        transitions_here those this process made (and announced).
        """
        snapshot: dict[str, Any] = {
            "name": self.name,
            "enabled": self.enabled,
            "storage": "memory",
            "degraded": None,
            "state": CLOSED,
            "fail_count": 0,
            "success_count": 0,
            "opened_at": None,
            "retry_at": None,
            "trial_in_progress": False,
            "last_error_kind": None,
            "transitions": 0,
            "transitions_here": 0,
        }
        if not self.enabled:
            return snapshot

        circuit = self._circuit()
        try:
            storage = circuit.storage
            snapshot.update(
                storage=storage.kind,
                degraded=self.degraded_reason,
                state=storage.state,
                fail_count=storage.counter,
                success_count=storage.success_counter,
                opened_at=storage.opened_epoch,
                retry_at=self._retry_at(storage),
                trial_in_progress=storage.lease_holder() is not None,
                last_error_kind=storage.last_error_kind,
                transitions=storage.transitions,
                transitions_here=sum(circuit.announced.values()),
            )
        except STORE_ERRORS as error:
            self._store_failed(circuit, error, "snapshot")
            snapshot["degraded"] = self.degraded_reason

        shared = self._shared_state()
        if snapshot["degraded"] is None and shared is not None:
            snapshot["degraded"] = shared.degraded_reason
        return snapshot

    def force_close(self) -> None:
        """Close the circuit now and forget its failures (an operator's action)."""
        if not self.enabled:
            return

        circuit = self._circuit()
        try:
            with self._changing(circuit):
                circuit.recorder.by_operator = True
                try:
                    circuit.breaker.close()
                finally:
                    circuit.recorder.by_operator = False
                circuit.storage.release_lease(None)
        except STORE_ERRORS as error:
            self._store_failed(circuit, error, "force_close")

    def trip(self, error_kind: str) -> None:
        """Open the circuit now, whatever the count.

        For a failure no retry can mend, such as an expired login: the agent
        is out until a trial call, after reset_timeout, succeeds.
        """
        if not self.enabled:
            return

        circuit = self._circuit()
        try:
            with self._changing(circuit):
                if circuit.storage.state == OPEN:
                    return
                circuit.storage.last_error_kind = error_kind
                circuit.breaker.open()
                circuit.storage.release_lease(None)
        except STORE_ERRORS as error:
            self._store_failed(circuit, error, "trip")

    # -- the steps --------------------------------------------------------

    def _admit(self, circuit: _Circuit, lease_seconds: float | None) -> Ticket:
        storage = circuit.storage

        # The common case, closed, costs one read and no lock.
        state = storage.state
        if state == CLOSED:
            return Ticket(self.name, trial=False)
        if state == OPEN:
            self._refuse_until_due(storage)

        # A trial may be due. Decide inside the critical section, so that a
        # trial that has just failed and reopened the circuit is seen.
        owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        seconds = lease_seconds if lease_seconds and lease_seconds > 0 else self.reset_timeout
        with self._changing(circuit):
            state = storage.state
            if state == CLOSED:
                return Ticket(self.name, trial=False)
            if state == OPEN:
                self._refuse_until_due(storage)

            if not storage.take_lease(owner, seconds):
                raise self._trial_in_progress()
            if state == OPEN:
                circuit.breaker.half_open()

        return Ticket(self.name, trial=True, owner=owner)

    def _trial_in_progress(self) -> CircuitOpen:
        return CircuitOpen(
            f"circuit breaker {self.name!r} is half-open and a trial call is in "
            f"progress; other calls wait for its outcome",
            retry_at=None,
            breaker=self.name,
        )

    def _refuse_until_due(self, storage: Storage) -> None:
        retry_at = self._retry_at(storage)
        if retry_at is None:
            return
        now = self._clock()
        if now >= retry_at:
            return
        raise CircuitOpen(
            f"circuit breaker {self.name!r} is open after {storage.counter} failures "
            f"(last: {storage.last_error_kind}); the next trial call is due at "
            f"{_clock_time(retry_at)} (in {retry_at - now:.1f} s)",
            retry_at=retry_at,
            breaker=self.name,
        )

    def _record(self, circuit: _Circuit, ticket: Ticket, error_kind: str | None) -> None:
        storage = circuit.storage

        # A success with nothing to reset changes nothing: skip the lock.
        if (
            error_kind is None
            and not ticket.trial
            and storage.state == CLOSED
            and storage.counter == 0
        ):
            return

        with self._changing(circuit):
            state = storage.state
            if ticket.trial:
                holder = storage.lease_holder()
                storage.release_lease(ticket.owner)

                # A trial whose lease ran out while another trial took over,
                # or that a later trial's failure overtook, decides nothing.
                if state == OPEN or holder not in (None, ticket.owner):
                    return
            elif state != CLOSED:
                return

            if error_kind is not None:
                storage.last_error_kind = error_kind
            try:
                circuit.breaker.call(_replay, error_kind)
            except (pybreaker.CircuitBreakerError, _RecordedFailure):
                # CircuitBreakerError: this failure opened the circuit.
                pass

    def _retry_at(self, storage: Storage) -> float | None:
        state = storage.state
        if state == CLOSED:
            return None
        if state == HALF_OPEN and storage.lease_holder() is not None:
            return None
        opened = storage.opened_epoch
        return None if opened is None else opened + self.reset_timeout

    @contextlib.contextmanager
    def _changing(self, circuit: _Circuit) -> Iterator[None]:
        """A critical section whose transitions are announced once it commits."""
        recorder = circuit.recorder
        with circuit.storage.critical_section():
            recorder.collected.clear()

            # Adopt, silently, a state another process has set.
            circuit.breaker.state  # noqa: B018

            yield
            made = list(recorder.collected)
            recorder.collected.clear()

        for transition in made:
            self._announce(circuit, transition)

    def _announce(self, circuit: _Circuit, transition: Transition) -> None:
        circuit.announced[transition.new] += 1
        fields = {
            "breaker": self.name,
            "old_state": transition.old,
            "new_state": transition.new,
            "fail_count": transition.fail_count,
        }

        if transition.new == OPEN and transition.old == HALF_OPEN:
            log.warning(
                "circuit breaker %s reopened: the trial call failed (%s); "
                "calls are refused until %s",
                self.name,
                transition.last_error_kind,
                _clock_time(transition.retry_at or self._clock()),
                extra=fields,
            )
        elif transition.new == OPEN:
            log.warning(
                "circuit breaker %s opened after %d consecutive failures (last: %s); "
                "calls are refused until %s",
                self.name,
                transition.fail_count,
                transition.last_error_kind,
                _clock_time(transition.retry_at or self._clock()),
                extra=fields,
            )
        elif transition.new == HALF_OPEN:
            log.info(
                "circuit breaker %s half-open: one trial call admitted (pid %d)",
                self.name,
                os.getpid(),
                extra=fields,
            )
        elif transition.by_operator:
            log.info(
                "circuit breaker %s closed by an operator (was %s)",
                self.name,
                transition.old,
                extra=fields,
            )
        else:
            log.info(
                "circuit breaker %s closed: %d trial call(s) succeeded",
                self.name,
                self.success_threshold,
                extra=fields,
            )

        hook = self.on_transition
        if hook is None:
            return
        try:
            hook(self.name, transition.old, transition.new)
        except Exception:
            log.exception("circuit breaker %s: the on_transition hook failed", self.name)

    # -- this process's circuit -------------------------------------------

    def _circuit(self) -> _Circuit:
        circuit = self._circuit_now
        pid = os.getpid()
        shared = self._shared_state()
        if shared is not None and not shared.is_shared:
            shared = None
        if circuit is not None and circuit.pid == pid and circuit.shared is shared:
            return circuit

        # Built again when Redis goes away or comes back, as after a fork.
        with _build_lock:
            circuit = self._circuit_now
            if circuit is None or circuit.pid != pid or circuit.shared is not shared:
                circuit = self._build(pid, shared)
                self._circuit_now = circuit
            return circuit

    def _shared_state(self) -> SharedState | None:
        """The redis shared state for a disk breaker, or None."""
        if not self._wants_shared:
            return None
        shared = shared_state_at(self._state_key)
        return None if shared is None or shared.backend == "local" else shared

    def _build(self, pid: int, shared: SharedState | None = None) -> _Circuit:
        if shared is not None:
            try:
                storage = shared.circuit_storage(self.name, self._clock)
                if storage is not None:
                    return self._assemble(pid, storage, shared)
            except SharedStateError:
                pass  # Gone while building: the state directory stands in.

        if self.directory is not None and self.degraded_reason is None:
            try:
                store = open_private_cache(self.directory, eviction_policy="none")
                return self._assemble(pid, DiskCircuitStorage(store, self._clock))
            except STORE_ERRORS as error:
                self._degrade(f"cannot open {self.directory}: {type(error).__name__}: {error}")
        return self._assemble(pid, MemoryCircuitStorage(self._clock))

    def _assemble(self, pid: int, storage: Storage, shared: SharedState | None = None) -> _Circuit:
        recorder = _TransitionRecorder(storage, self.reset_timeout)
        breaker = _SharedCircuit(
            fail_max=self.fail_max,
            reset_timeout=self.reset_timeout,
            success_threshold=self.success_threshold,
            state_storage=storage,
            listeners=[recorder],
            name=self.name,
        )
        directory = self.directory if isinstance(storage, DiskCircuitStorage) else None
        return _Circuit(pid, storage, breaker, recorder, directory, shared=shared)

    def _read(self, read: Callable[[Storage], Any], default: Any) -> Any:
        circuit = self._circuit()
        try:
            return read(circuit.storage)
        except STORE_ERRORS as error:
            self._store_failed(circuit, error, "read")
        try:
            return read(self._circuit().storage)
        except STORE_ERRORS:
            return default

    def _store_failed(self, circuit: _Circuit, error: BaseException, action: str) -> None:
        if isinstance(error, SharedStateError):
            self._shared_failed(circuit, error, action)
            return
        if not is_store_broken(error):
            log.warning(
                "circuit breaker %s: state store busy in %s, %s went ahead without it: %s",
                self.name,
                circuit.directory,
                action,
                error,
                extra={"breaker": self.name},
            )
            return

        self._degrade(f"{action} failed in {circuit.directory}: {type(error).__name__}: {error}")
        with _build_lock:
            if self._circuit_now is circuit:
                self._circuit_now = self._assemble(os.getpid(), MemoryCircuitStorage(self._clock))

    def _shared_failed(self, circuit: _Circuit, error: SharedStateError, action: str) -> None:
        if isinstance(error, SharedStateBusy):
            log.warning(
                "circuit breaker %s: shared state busy in %s, it went ahead without it: %s",
                self.name,
                action,
                error,
                extra={"breaker": self.name},
            )
            return

        # The shared state has logged the outage once, for every user of it.
        # The next use builds this process's circuit on the state directory.
        with _build_lock:
            if self._circuit_now is circuit:
                self._circuit_now = None

    def _degrade(self, reason: str) -> None:
        if self.degraded_reason is not None:
            return
        self._degraded = (os.getpid(), reason)
        log.warning(
            "circuit breaker %s falls back to memory storage in this process "
            "(not shared with other processes, starts closed): %s",
            self.name,
            reason,
            extra={"breaker": self.name},
        )
