"""state.backend redis: the breaker, rate limit and cache shared by every host.

    host A --+                       Redis (one per account's quota)
    host B --+-- RedisState ------>  PREFIX:breaker:NAME         hash: the circuit
    host C --+   (one per process     PREFIX:breaker:NAME:trial   the half-open lease (PX)
                  and state dir)      PREFIX:breaker:NAME:lock    a change in progress (PX)
                                      PREFIX:ratelimit:NAME       hash: the token bucket
                                      PREFIX:ratelimit:NAME:hosts who took tokens lately
                                      PREFIX:cache:v:KEY          a pickled Response (PX ttl)
                                      PREFIX:cache:f:KEY          a call in flight (PX lease)
                                      PREFIX:cache:stats          hits, misses, joined

- The breaker is pybreaker's state machine on RedisCircuitStorage. Each
  change runs under a lock key (SET NX PX), so one host at a time decides;
  the one half-open trial is a lease key with an expiry, so a host that dies
  mid-trial frees it when the lease runs out.
- The rate limit is one token bucket refilled and taken inside one Lua
  script (EVALSHA), timed by the server's clock: no host reads, computes
  and writes back, and clock skew between hosts does not matter.
- The cache stores pickled responses with SET PX. A miss claims the call's
  flight key; another host missing the same key waits for the answer to land
  (short polls, bounded by the lease) instead of paying for it again.

Why not pybreaker's own CircuitRedisStorage: it swallows every RedisError
(logging a traceback per call) and answers fallback_circuit_state with a
failure count of 0, so during an outage the breaker can never open and
nobody is told to fall back; it has no lease, so every host goes half-open
and sends its own trial at once; its transitions are read-modify-write
from each host without a lock; its constructor talks to Redis (and raises
when it is down); opened_at is kept in whole seconds. Its key layout
(NAMESPACE:pybreaker:field) is the idea kept here, under state.redis_prefix.

Unreachable or slow (state.redis_timeout) Redis: the first failure marks
this process degraded, logs one warning, calls on_change, and starts a
daemon thread that pings with backoff. Until it succeeds every use answers
SharedStateUnavailable at once, without touching the network, and the
callers use the state directory. Nothing waits on Redis longer than one
timeout, and that once per outage.

Trust: cached values are pickles, so anyone who can write to this Redis can
run code in every supervisor that reads from it, as anyone who can write to
the state directory can. Protect it (password, TLS, a private network).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pybreaker

from ralph_supervisor.backend import (
    SharedState,
    SharedStateBusy,
    SharedStateError,
    SharedStateUnavailable,
)

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - exercised only without the extra
    redis = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED = pybreaker.STATE_CLOSED

# The longest wait between reconnection attempts.
MAX_RETRY_INTERVAL = 30.0

# An outage that starts this soon after the last one ended is the same
# outage flapping: it keeps the backoff and is logged at info, not warning.
FLAP_WINDOW = 60.0

# The breaker's lock: held for the few round trips of one change. It expires
# so that a process that dies holding it blocks the others for this long at
# most; a change that cannot get it in LOCK_WAIT goes ahead without it.
LOCK_TTL_MS = 2000
LOCK_WAIT = 1.0

# Hosts that took a token within this window count for the fair share each
# host keeps of the rate while it runs on its local bucket.
HOST_WINDOW_MS = 120_000

# Polls of a waiter for another host's answer: first after FLIGHT_POLL_MIN,
# growing to FLIGHT_POLL_MAX, so an answer is seen at most that late.
FLIGHT_POLL_MIN = 0.02
FLIGHT_POLL_MAX = 0.25

# Errors from the client that mean Redis cannot serve us now. A ResponseError
# (NOAUTH, READONLY after a failover, OOM) is as much an outage to us as a
# refused connection: the host falls back either way.
if redis is not None:
    REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
else:  # pragma: no cover
    REDIS_ERRORS = (OSError,)


# Refill to the server's clock, then take a token or say how long until one.
# KEYS: bucket, hosts. ARGV: rate per second, capacity, host id, now in
# microseconds ("" for the server's TIME: every host on one clock), the
# host window in ms. Returns {wait in microseconds (0: taken), hosts seen}.
#
# Callers told to wait are told different times, one token apart ('next':
# the first time not yet given out). Told the same time, every waiting
# caller of every host would come back at once for each token and all but
# one ask again: round trips per call would grow with the callers waiting.
# A wait still takes nothing, and a token that is there goes to whoever
# asks: a caller that gave up leaves its token to the next asker.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local stored = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'next')
local tokens = tonumber(stored[1]) or capacity
local last = tonumber(stored[2]) or now
local next_free = tonumber(stored[3]) or 0
if now > last then
  tokens = math.min(capacity, tokens + (now - last) / 1000000 * rate)
end

local wait = 0
if tokens >= 1 - 1e-9 then
  tokens = math.max(0, tokens - 1)
else
  local due = now + math.ceil((1 - tokens) / rate * 1000000)
  local slot = math.max(due, next_free)
  wait = slot - now
  next_free = slot + math.ceil(1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%d', now), 'next', string.format('%d', next_free))
local idle_ms = math.ceil(capacity / rate * 1000) + 1000
redis.call('PEXPIRE', KEYS[1], math.max(idle_ms, math.ceil((next_free - now) / 1000) + 1000))

redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ARGV[5] * 1000)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {wait, redis.call('ZCARD', KEYS[2])}
"""

# Delete a key only while it holds our token: a lease or lock that expired
# and was taken by another process is theirs now.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: value, flight, stats. ARGV: owner, lease ms.
# Returns {value or false, flight holder or false}: a hit, or the process
# that is making the call (ours when this call just claimed it).
LOOKUP_LUA = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('HINCRBY', KEYS[3], 'hits', 1)
  return {value, false}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[3], 'misses', 1)
  return {false, ARGV[1]}
end
return {false, redis.call('GET', KEYS[2])}
"""

# KEYS: value, flight. ARGV: pickled response, ttl ms, owner.
STORE_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
"""


def hide_password(url: str) -> str:
    """The URL for logs and health: user kept, password replaced."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "redis://***"


def connect(settings: Any) -> Any:
    """A client for state.redis_url with the state section's timeouts, TLS
    and password. Nothing is sent until the first command."""
    if redis is None:
        raise ValueError(
            "state.backend redis needs the redis package: pip install 'ralph-supervisor[redis]'"
        )

    url = settings.redis_url
    if settings.redis_tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://") :]

    timeout = float(settings.redis_timeout)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # redis-py retries up to 10 times with backoff by default, which
        # turns a dead server into a hung call. Retry once, and only a
        # connection error: a pooled connection that a Redis restart broke.
        # A timeout is not retried: the command may have run (a token taken).
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        "client_name": f"ralph-supervisor-{os.uname().nodename}-{os.getpid()}",
    }
    if settings.redis_password_file:
        path = Path(settings.redis_password_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ValueError(f"state.redis_password_file: cannot read {path}: {error}") from None
        options["password"] = lines[0].strip() if lines else ""
    if url.startswith("rediss://") and settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = str(Path(settings.redis_tls_ca_file).expanduser())

    return redis.Redis.from_url(url, **options)


@dataclass
class _Outage:
    reason: str
    since: float  # time.monotonic()
    since_wall: float  # time.time(), for the operator


@dataclass
class _ProcessState:
    """What one process knows of the connection; a forked child starts anew
    (the parent's reconnection thread does not exist in it)."""

    pid: int
    owner: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    outage: _Outage | None = None
    reconnector: threading.Thread | None = None
    retry_delay: float = 0.0
    restored_at: float | None = None
    degradations: int = 0
    restorations: int = 0
    round_trips: int = 0


class RedisState(SharedState):
    """One Redis connection pool and its health, for one state directory.

    `settings` is the state section of the configuration. `flight_lease` is
    the longest a call may run (adapter.timeout): a waiter for another host's
    answer waits no longer. `host_id` names this host's local budget in the
    fair-share count.
    """

    backend = "redis"

    def __init__(
        self,
        settings: Any,
        *,
        flight_lease: float,
        host_id: str,
        client: Any = None,
    ) -> None:
        self.settings = settings
        self.url = hide_password(settings.redis_url)
        self.prefix = settings.redis_prefix
        self.retry_interval = float(settings.redis_retry_interval)
        self.flight_lease = float(flight_lease)
        self.host_id = host_id
        self.on_change = None
        self.client = client if client is not None else connect(settings)
        self._closed = threading.Event()
        self._process: _ProcessState | None = None

        self.token_bucket_script = self.client.register_script(TOKEN_BUCKET_LUA)
        self.release_script = self.client.register_script(RELEASE_LUA)
        self.lookup_script = self.client.register_script(LOOKUP_LUA)
        self.store_script = self.client.register_script(STORE_LUA)

        # Find out now, at start, rather than on the first call: a wrong URL
        # or password is logged before any work is done.
        with contextlib.suppress(SharedStateError):
            self.call("connect", lambda client: client.ping())

    # -- connection health ------------------------------------------------

    def _here(self) -> _ProcessState:
        here = self._process
        pid = os.getpid()
        if here is None or here.pid != pid:
            here = _ProcessState(pid, f"{os.uname().nodename}:{pid}:{uuid.uuid4().hex[:8]}")
            self._process = here
        return here

    @property
    def owner(self) -> str:
        """This process's token in leases and flights."""
        return self._here().owner

    @property
    def is_shared(self) -> bool:
        return self._here().outage is None and not self._closed.is_set()

    @property
    def degraded_reason(self) -> str | None:
        outage = self._here().outage
        return None if outage is None else outage.reason

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def call(self, action: str, operation: Callable[[Any], T]) -> T:
        """Run one round trip, or raise SharedStateUnavailable at once while
        degraded (and for the failure that degrades it)."""
        here = self._here()
        outage = here.outage
        if outage is not None:
            raise SharedStateUnavailable(outage.reason)
        if self._closed.is_set():
            raise SharedStateUnavailable("the shared state is closed")

        here.round_trips += 1
        try:
            return operation(self.client)
        except REDIS_ERRORS as error:
            reason = f"{self.url}: {action}: {type(error).__name__}: {error}"
            self._degrade(here, reason)
            raise SharedStateUnavailable(reason) from error

    def _degrade(self, here: _ProcessState, reason: str) -> None:
        now = time.monotonic()
        with here.lock:
            if here.outage is not None:
                return
            here.outage = _Outage(reason, now, time.time())
            here.degradations += 1
            flapping = here.restored_at is not None and now - here.restored_at < FLAP_WINDOW
            if not flapping:
                here.retry_delay = self.retry_interval
            here.reconnector = threading.Thread(
                target=self._reconnect,
                args=(here,),
                name=f"redis-reconnect-{self.prefix}",
                daemon=True,
            )
            here.reconnector.start()

        level = logging.INFO if flapping else logging.WARNING
        log.log(
            level,
            "shared state unavailable (%s): this host now uses its local breaker, "
            "rate limit (its fair share of the account's rate) and cache; calls go on. "
            "Reconnecting in the background, first in %.1f s",
            reason,
            here.retry_delay,
            extra={"backend": "redis", "redis": self.url},
        )
        self._notify(True, reason)

    def _reconnect(self, here: _ProcessState) -> None:
        while not self._closed.wait(here.retry_delay):
            if self._process is not here:
                return
            try:
                self.client.ping()
            except REDIS_ERRORS as error:
                here.retry_delay = min(here.retry_delay * 2, MAX_RETRY_INTERVAL)
                log.debug(
                    "shared state: reconnection failed (%s: %s); next in %.1f s",
                    type(error).__name__,
                    error,
                    here.retry_delay,
                    extra={"backend": "redis", "redis": self.url},
                )
                continue

            self._restore(here)
            return

    def _restore(self, here: _ProcessState) -> None:
        # Connections opened before the outage may be dead; drop the idle
        # ones rather than let each fail once.
        with contextlib.suppress(Exception):
            self.client.connection_pool.disconnect(inuse_connections=False)

        with here.lock:
            outage = here.outage
            here.outage = None
            here.reconnector = None
            here.restored_at = time.monotonic()
            here.restorations += 1
        lasted = 0.0 if outage is None else here.restored_at - outage.since
        log.warning(
            "shared state restored (%s) after %.1f s: breaker, rate limit and cache "
            "are shared with the other hosts again",
            self.url,
            lasted,
            extra={"backend": "redis", "redis": self.url},
        )
        self._notify(False, None)

    def _notify(self, degraded: bool, reason: str | None) -> None:
        hook = self.on_change
        if hook is None:
            return
        try:
            hook(degraded, reason)
        except Exception:
            log.exception("shared state: the on_change hook failed")

    def health(self) -> tuple[bool, str | None]:
        outage = self._here().outage
        if outage is None:
            return True, None
        since = datetime.fromtimestamp(outage.since_wall).astimezone()
        return False, (
            f"degraded: shared state unavailable since {since:%H:%M:%S} "
            f"({outage.reason}); this host uses local state"
        )

    def stats(self) -> dict[str, Any]:
        here = self._here()
        outage = here.outage
        return {
            "backend": self.backend,
            "url": self.url,
            "prefix": self.prefix,
            "shared": self.is_shared,
            "degraded": None if outage is None else outage.reason,
            "degraded_for_s": None if outage is None else time.monotonic() - outage.since,
            "degradations": here.degradations,
            "restorations": here.restorations,
            "round_trips": here.round_trips,
        }

    def close(self) -> None:
        self._closed.set()
        reconnector = self._here().reconnector
        if reconnector is not None and reconnector is not threading.current_thread():
            reconnector.join(timeout=1.0)
        with contextlib.suppress(Exception):
            self.client.connection_pool.disconnect()

    # -- the three shared things -------------------------------------------

    def circuit_storage(self, name: str, clock: Callable[[], float]) -> RedisCircuitStorage:
        return RedisCircuitStorage(self, name, clock)

    def token_bucket(self, name: str, rate: float, capacity: float) -> RedisTokenBucket:
        return RedisTokenBucket(self, name, rate, capacity)

    def response_store(self, ttl: float) -> RedisResponseStore:
        return RedisResponseStore(self, ttl)


# ---------------------------------------------------------------------------
# The breaker


class RedisCircuitStorage(pybreaker.CircuitBreakerStorage):
    """A pybreaker storage in one Redis hash, with the trial lease and a lock.

    The same interface as breaker.DiskCircuitStorage. Every method is one
    round trip; any failure raises SharedStateUnavailable (Breaker falls
    back to its state directory), never a made-up state.
    """

    kind = "redis"

    def __init__(self, shared: RedisState, name: str, clock: Callable[[], float]) -> None:
        super().__init__("redis")
        self._shared = shared
        self._clock = clock
        self._hash = shared.key("breaker", name)
        self._trial = shared.key("breaker", name, "trial")
        self._lock = shared.key("breaker", name, "lock")

    def _get(self, field_name: str) -> str | None:
        value = self._shared.call("breaker read", lambda r: r.hget(self._hash, field_name))
        return None if value is None else value.decode()

    def _set(self, field_name: str, value: Any) -> None:
        self._shared.call("breaker write", lambda r: r.hset(self._hash, field_name, value))

    def _incr(self, field_name: str) -> None:
        self._shared.call("breaker write", lambda r: r.hincrby(self._hash, field_name, 1))

    @property
    def state(self) -> str:
        return self._get("state") or CLOSED

    @state.setter
    def state(self, state: str) -> None:
        self._set("state", str(state))

    def increment_counter(self) -> None:
        self._incr("fail_counter")

    def reset_counter(self) -> None:
        self._set("fail_counter", 0)

    def increment_success_counter(self) -> None:
        self._incr("success_counter")

    def reset_success_counter(self) -> None:
        self._set("success_counter", 0)

    @property
    def counter(self) -> int:
        return int(self._get("fail_counter") or 0)

    @property
    def success_counter(self) -> int:
        return int(self._get("success_counter") or 0)

    @property
    def opened_at(self) -> datetime | None:
        epoch = self.opened_epoch
        return None if epoch is None else datetime.fromtimestamp(epoch, UTC)

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        # Stamped with the breaker's clock, as the other storages do; hosts
        # must agree on the time (NTP) to agree on when a trial is due.
        self._set("opened_at", repr(self._clock()))

    @property
    def opened_epoch(self) -> float | None:
        value = self._get("opened_at")
        return None if value is None else float(value)

    @contextlib.contextmanager
    def critical_section(self) -> Iterator[None]:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT
        pause = 0.001
        while not self._shared.call(
            "breaker lock",
            lambda r: r.set(self._lock, token, nx=True, px=LOCK_TTL_MS),
        ):
            if time.monotonic() >= deadline:
                raise SharedStateBusy(f"{self._lock} held by another process for {LOCK_WAIT} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        try:
            yield
        finally:
            # A lock we cannot release expires in LOCK_TTL_MS.
            with contextlib.suppress(SharedStateError):
                self._shared.call(
                    "breaker unlock",
                    lambda r: self._shared.release_script(keys=[self._lock], args=[token]),
                )

    def take_lease(self, owner: str, seconds: float) -> bool:
        milliseconds = max(1, int(seconds * 1000))
        taken = self._shared.call(
            "breaker lease",
            lambda r: r.set(self._trial, owner, nx=True, px=milliseconds),
        )
        return bool(taken)

    def lease_holder(self) -> str | None:
        holder = self._shared.call("breaker lease", lambda r: r.get(self._trial))
        return None if holder is None else holder.decode()

    def release_lease(self, owner: str | None) -> None:
        if owner is None:
            self._shared.call("breaker lease", lambda r: r.delete(self._trial))
            return
        self._shared.call(
            "breaker lease",
            lambda r: self._shared.release_script(keys=[self._trial], args=[owner]),
        )

    def count_transition(self) -> None:
        self._incr("transitions")

    @property
    def transitions(self) -> int:
        return int(self._get("transitions") or 0)

    @property
    def last_error_kind(self) -> str | None:
        return self._get("last_error_kind")

    @last_error_kind.setter
    def last_error_kind(self, kind: str | None) -> None:
        if kind is None:
            self._shared.call("breaker write", lambda r: r.hdel(self._hash, "last_error_kind"))
        else:
            self._set("last_error_kind", kind)


# ---------------------------------------------------------------------------
# The rate limit


class RedisTokenBucket:
    """One token bucket for every host, kept and taken from in the server.

    reserve() is RateLimiter.reserve(): 0.0 when a token was taken, else the
    seconds until one is due (nothing taken). `clock` (epoch seconds) is for
    tests; by default the server's clock times the bucket.
    """

    def __init__(
        self,
        shared: RedisState,
        name: str,
        rate: float,
        capacity: float,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._shared = shared
        self.rate = rate
        self.capacity = capacity
        self._keys = [shared.key("ratelimit", name), shared.key("ratelimit", name, "hosts")]
        self._clock = clock

        # Hosts that took tokens lately, this one included: while Redis is
        # away each host keeps 1/hosts of the rate, so that together they
        # stay near the quota instead of each taking all of it.
        self.hosts = 1

    @property
    def share(self) -> float:
        return 1.0 / max(1, self.hosts)

    def reserve(self) -> float:
        now = "" if self._clock is None else str(int(self._clock() * 1_000_000))
        args = [repr(self.rate), repr(self.capacity), self._shared.host_id, now, HOST_WINDOW_MS]
        wait_us, hosts = self._shared.call(
            "rate limit",
            lambda r: self._shared.token_bucket_script(keys=self._keys, args=args),
        )
        self.hosts = max(1, int(hosts))
        return int(wait_us) / 1_000_000


# ---------------------------------------------------------------------------
# The response cache


class RedisResponseStore:
    """Responses shared by every host, and calls in flight joined across hosts.

    get(key) answers a stored response; or None, and then the caller makes
    the call and should put() its answer (the flight is released by put(),
    by abandon(), or when its lease, the longest a call may run, ends).
    When another process is making the same call, get() waits for its
    answer. A flight of this process is never waited for: the caller's own
    single-flight joins the threads of one process.
    """

    def __init__(self, shared: RedisState, ttl: float) -> None:
        self._shared = shared
        self.ttl_ms = max(1, int(ttl * 1000))
        self.lease_ms = max(1, int(shared.flight_lease * 1000))
        self._stats = shared.key("cache", "stats")

    def _keys(self, key: str) -> tuple[str, str]:
        return self._shared.key("cache", "v", key), self._shared.key("cache", "f", key)

    def get(self, key: str, *, wait: bool = True) -> Any | None:
        value_key, flight_key = self._keys(key)
        owner = self._shared.owner
        deadline = time.monotonic() + self._shared.flight_lease

        while True:
            value, holder = self._shared.call(
                "cache read",
                lambda r: self._shared.lookup_script(
                    keys=[value_key, flight_key, self._stats], args=[owner, self.lease_ms]
                ),
            )
            if value:
                return self._load(key, value)
            if not holder or holder.decode() == owner or not wait:
                return None

            value = self._wait_for_answer(value_key, flight_key, holder.decode(), deadline)
            if value is not None:
                return self._load(key, value)
            if time.monotonic() >= deadline:
                return None
            # The flight ended without an answer: look again, and maybe lead.

    def _wait_for_answer(
        self, value_key: str, flight_key: str, holder: str, deadline: float
    ) -> bytes | None:
        log.debug(
            "response cache: %s is making this call; waiting for its answer",
            holder,
            extra={"cache_key": value_key},
        )
        pause = FLIGHT_POLL_MIN

        def poll(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.get(value_key)
            pipe.exists(flight_key)
            return list(pipe.execute())

        while time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, FLIGHT_POLL_MAX)
            value, in_flight = self._shared.call("cache wait", poll)
            if value is not None:
                self._shared.call("cache stats", lambda r: r.hincrby(self._stats, "joined", 1))
                return bytes(value)
            if not in_flight:
                return None
        return None

    def _load(self, key: str, value: bytes) -> Any | None:
        try:
            return pickle.loads(value)
        except Exception as error:
            # An entry an older release wrote, or garbage: call the agent.
            log.warning(
                "dropping unreadable shared cache entry %s: %s: %s",
                key[:12],
                type(error).__name__,
                error,
                extra={"cache_key": key},
            )
            value_key, _ = self._keys(key)
            with contextlib.suppress(SharedStateError):
                self._shared.call("cache drop", lambda r: r.delete(value_key))
            return None

    def put(self, key: str, response: Any) -> None:
        value_key, flight_key = self._keys(key)
        data = pickle.dumps(response, protocol=pickle.HIGHEST_PROTOCOL)
        owner = self._shared.owner
        self._shared.call(
            "cache write",
            lambda r: self._shared.store_script(
                keys=[value_key, flight_key], args=[data, self.ttl_ms, owner]
            ),
        )

    def abandon(self, key: str) -> None:
        """The call this process led for `key` ended without an answer to keep:
        let a waiting host make it now rather than when the lease ends."""
        _, flight_key = self._keys(key)
        owner = self._shared.owner
        self._shared.call(
            "cache release",
            lambda r: self._shared.release_script(keys=[flight_key], args=[owner]),
        )

    def _scan(self, r: Any) -> Iterator[list[Any]]:
        batch: list[Any] = []
        for name in r.scan_iter(match=self._shared.key("cache", "v", "*"), count=1000):
            batch.append(name)
            if len(batch) >= 1000:
                yield batch
                batch = []
        if batch:
            yield batch

    def stats(self) -> dict[str, Any]:
        def read(r: Any) -> dict[str, Any]:
            counts = {k.decode(): int(v) for k, v in r.hgetall(self._stats).items()}
            entries = size = 0
            for batch in self._scan(r):
                pipe = r.pipeline(transaction=False)
                for name in batch:
                    pipe.strlen(name)
                lengths = pipe.execute()
                entries += len(batch)
                size += sum(lengths)
            return {"counts": counts, "entries": entries, "size": size}

        found = self._shared.call("cache stats", read)
        counts = found["counts"]
        hits = counts.get("hits", 0) + counts.get("joined", 0)
        misses = counts.get("misses", 0)
        return {
            "entries": found["entries"],
            "size_bytes": found["size"],
            "hits": hits,
            "misses": misses,
            "joined": counts.get("joined", 0),
            "hit_ratio": hits / (hits + misses) if hits + misses else None,
        }

    def clear(self) -> int:
        def remove(r: Any) -> int:
            removed = 0
            for batch in self._scan(r):
                removed += int(r.unlink(*batch))
            return removed

        return int(self._shared.call("cache clear", remove))
