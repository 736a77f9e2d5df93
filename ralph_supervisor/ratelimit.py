"""The rate limit: how many calls may start per minute, across processes.

A token bucket of `burst` tokens that refills at limits.requests_per_minute;
each call start takes one token. The bucket lives in a diskcache store under
STATE_DIR/ratelimit/<name> and every update reads, refills and takes inside
one SQLite transaction (diskcache.recipes.throttle works the same way), so
every process on the host that shares the state directory shares one budget.

    reserve()          take a token now (0.0), or say how long until one is due
    acquire(deadline)  sleep until a token is taken, or raise QChatTimeout
                       at once when none will be due before the deadline

Without requests_per_minute there is no limit and reserve() costs nothing.
An unusable directory falls back to a bucket in this process, with one
warning: the limit then holds per process, not per host.

With state.backend redis the bucket lives in Redis and is one budget for
every host (redis_backend.RedisTokenBucket). While Redis is away, the bucket
in the state directory takes over with this host's fair share of the rate:
1/N of it, N being the hosts that took tokens in the last two minutes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ralph_supervisor.backend import SharedStateError, shared_state_at, state_dir_key
from ralph_supervisor.cache import STORE_ERRORS, ProcessLocalCache, is_store_broken, reason_here
from ralph_supervisor.errors import QChatTimeout

log = logging.getLogger(__name__)

_BUCKET = "bucket"

# A token due in less than this is taken now: float dust after a sleep of
# exactly the predicted wait must not cost another round.
_TOKEN_EPSILON = 1e-9

# The shortest sleep between tries, so that a loop never spins.
MIN_WAIT = 0.001

# What reserve() answers when another process held the store too long to
# wait for: try again shortly rather than start a call unmetered.
BUSY_WAIT = 0.05

Bucket = tuple[float, float]


class RateLimiter:
    """A token bucket for call starts, shared through the state directory.

    `settings` is the limits section of the configuration, or anything with
    its attributes: requests_per_minute (None: no limit) and burst (None: one
    minute's worth, requests_per_minute tokens, and at least one). A full
    bucket lets `burst` calls start at once; after that they start at the
    rate. `clock` is wall-clock time (epoch seconds, shared by processes).
    """

    def __init__(
        self,
        settings: Any,
        state_dir: Path | None,
        *,
        name: str = "default",
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"rate limit name {name!r}: must be usable as a directory name")
        per_minute = settings.requests_per_minute
        self.name = name
        self.unlimited = per_minute is None
        self.rate = 0.0 if per_minute is None else float(per_minute) / 60.0
        if settings.burst is not None:
            self.capacity = float(settings.burst)
        else:
            self.capacity = max(1.0, float(per_minute or 1.0))
        if not self.unlimited and (self.rate <= 0 or self.capacity < 1):
            raise ValueError(
                f"limits: requests_per_minute and burst must be positive, got "
                f"{per_minute!r} and {settings.burst!r}"
            )

        self.directory = None if state_dir is None else Path(state_dir) / "ratelimit" / name
        self._store = None
        if self.directory is not None and not self.unlimited:
            self._store = ProcessLocalCache(self.directory, eviction_policy="none")
        self._clock = clock
        self._sleep = sleep

        # state.backend redis: the bucket every host shares.
        self._state_key = state_dir_key(state_dir)
        self._shared_bucket: Any = None
        self._shared_of: Any = None

        # The bucket of this process, when there is no shared one.
        self._local_bucket: Bucket | None = None
        self._local_lock = threading.Lock()
        self._degraded: tuple[int, str] | None = None

        self._stats_lock = threading.Lock()
        self.waits = 0
        self.waited_seconds_total = 0.0
        self.timeouts = 0

    def reserve(self) -> float:
        """Take a token and return 0.0, or return the seconds until one is due.

        Returning a wait takes nothing: ask again after it (another process
        may get there first).
        """
        if self.unlimited:
            return 0.0

        share = 1.0
        shared = self._shared()
        if shared is not None:
            try:
                return float(shared.reserve())
            except SharedStateError:
                share = shared.share

        store = self._open()
        if store is not None:
            try:
                with store.transact():
                    bucket, wait = self._take(store.get(_BUCKET), share)
                    if bucket is not None:
                        store.set(_BUCKET, bucket)
                return wait
            except STORE_ERRORS as error:
                if not is_store_broken(error):
                    log.info(
                        "rate limit %s: store busy, trying again in %.2f s: %s",
                        self.name,
                        BUSY_WAIT,
                        error,
                        extra={"ratelimit": self.name},
                    )
                    return BUSY_WAIT
                self._degrade(f"{type(error).__name__}: {error}")

        with self._local_lock:
            bucket, wait = self._take(self._local_bucket, share)
            if bucket is not None:
                self._local_bucket = bucket
        return wait

    def acquire(self, deadline: float | None = None) -> float:
        """Block until a token is taken; return the seconds waited.

        `deadline` is a time.monotonic() value. When the next token is due
        after it, raise QChatTimeout at once instead of sleeping in vain. That
        error has trips_breaker False: the service did nothing wrong.
        """
        started = time.monotonic()
        slept = False
        while True:
            wait = self.reserve()
            if wait <= 0:
                break

            wait = max(wait, MIN_WAIT)
            now = time.monotonic()
            if deadline is not None and now + wait > deadline:
                waited = now - started
                self._count(waited if slept else 0.0, timed_out=True)
                raise QChatTimeout(
                    "rate limit: no call slot before the deadline",
                    elapsed=waited,
                    retry_after=wait,
                    rate_limited=True,
                    retryable=False,
                    trips_breaker=False,
                )
            self._sleep(wait)
            slept = True

        if not slept:
            return 0.0
        waited = time.monotonic() - started
        self._count(waited)
        return waited

    # design.md calls it wait(deadline).
    wait = acquire

    @property
    def degraded_reason(self) -> str | None:
        """Why this process uses its own bucket instead of the shared one."""
        return reason_here(self._degraded)

    def stats(self) -> dict[str, Any]:
        """This process's waiting, for metrics."""
        with self._stats_lock:
            return {
                "name": self.name,
                "unlimited": self.unlimited,
                "requests_per_minute": None if self.unlimited else self.rate * 60.0,
                "burst": None if self.unlimited else self.capacity,
                "shared": self._store is not None and self.degraded_reason is None,
                "backend": "redis" if self._shared() is not None else "local",
                "waits": self.waits,
                "waited_seconds_total": self.waited_seconds_total,
                "timeouts": self.timeouts,
            }

    def close(self) -> None:
        """Close this process's connection to the store (reopened on next use)."""
        if self._store is not None:
            self._store.close()

    def _take(self, bucket: Bucket | None, share: float = 1.0) -> tuple[Bucket | None, float]:
        """Refill `bucket` to now and take a token from it.

        `share` scales rate and capacity: the part of a shared budget this
        host may use on its own. Return the bucket to store (None:
        unchanged) and the wait (0.0: taken).
        """
        rate = self.rate * share
        capacity = max(1.0, self.capacity * share)
        now = self._clock()
        if bucket is None:
            last, tokens = now, capacity
        else:
            last, tokens = bucket

        # A clock stepped back (NTP, or a store written before a reboot)
        # refills nothing, and the bucket is re-dated so it refills from now.
        went_back = now < last
        tokens = min(capacity, tokens + max(0.0, now - last) * rate)
        if tokens >= 1.0 - _TOKEN_EPSILON:
            return (now, max(0.0, tokens - 1.0)), 0.0

        wait = (1.0 - tokens) / rate
        return ((now, tokens) if went_back else None), wait

    def _count(self, waited: float, *, timed_out: bool = False) -> None:
        with self._stats_lock:
            if waited > 0:
                self.waits += 1
                self.waited_seconds_total += waited
            if timed_out:
                self.timeouts += 1

    def _shared(self) -> Any:
        """The shared bucket with state.backend redis, or None. Kept while
        Redis is away: it knows how many hosts share the rate."""
        state = shared_state_at(self._state_key)
        if state is None or state.backend == "local":
            return None
        if self._shared_of is not state:
            self._shared_bucket = state.token_bucket(self.name, self.rate, self.capacity)
            self._shared_of = state
        return self._shared_bucket

    def _open(self) -> Any:
        if self._store is None or self.degraded_reason is not None:
            return None
        try:
            return self._store.get()
        except STORE_ERRORS as error:
            self._degrade(f"cannot open {self.directory}: {type(error).__name__}: {error}")
            return None

    def _degrade(self, reason: str) -> None:
        if self.degraded_reason is not None:
            return
        self._degraded = (os.getpid(), reason)
        log.warning(
            "rate limit %s falls back to a bucket in this process (the limit now "
            "holds per process, not per host): %s",
            self.name,
            reason,
            extra={"ratelimit": self.name},
        )
