"""The response cache, its keys, single-flight, and private diskcache stores.

This module owns everything that keeps state in a diskcache directory:

- `cache_key()`: the SHA-256 name of a call, from everything that changes
  its answer.
- `ResponseCache`: answers of successful calls, kept in STATE_DIR/cache
  (or cache.dir) for cache.ttl seconds, shared by every process on the host.
- `SingleFlight`: identical calls in flight at once run once; the others
  wait for that one's result.
- `open_private_cache()` and `ProcessLocalCache`: how every diskcache store
  of ralph-supervisor (this cache, the breaker's and the rate limit's state)
  is opened: a 0700 directory, 0600 files, one connection per process,
  opened after fork and never inherited.

A broken cache directory (corrupt database, unwritable path) turns caching
off in that process with one warning: the cache is an optimisation and must
never fail a call.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import diskcache

from ralph_supervisor.backend import SharedStateError, shared_state_at, state_dir_key

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bump when the encoding in cache_key() changes, so old entries stop matching
# instead of answering a question they were not asked.
CACHE_KEY_VERSION = 1

# diskcache's SQLite file: created by us first, so that it and the -wal and
# -shm files SQLite derives from it (same mode as the database) are 0600.
DATABASE_NAME = diskcache.core.DBNAME

EVICTION_POLICIES = tuple(diskcache.core.EVICTION_POLICY)

# Seconds a write waits for another process's transaction before giving up.
# Long enough to ride out a burst of writers, short enough that a stuck
# store cannot hold a call: giving up only skips the cache for that call.
STORE_TIMEOUT = 5.0

_MISSING = object()


# ---------------------------------------------------------------------------
# Keys


def cache_key(
    *,
    prompt: str,
    argv: Sequence[str],
    model: str | None,
    cwd: str | None,
    agent: str,
) -> str:
    """Return the SHA-256 hex name of a call: same inputs, same key.

    The working directory is resolved (os.path.realpath) so that two spellings
    of one directory share entries, and two directories never do.
    """
    call = {
        "version": CACHE_KEY_VERSION,
        "agent": agent,
        "argv": list(argv),
        "model": model,
        "cwd": os.path.realpath(cwd) if cwd is not None else None,
        "prompt": prompt,
    }
    encoded = json.dumps(call, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    # surrogatepass: a prompt that slipped past validation with a lone
    # surrogate must still get a key rather than crash the lookup.
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------------------
# Private diskcache stores


def is_store_broken(error: BaseException) -> bool:
    """Whether an error from a diskcache store means the store cannot work.

    A lock held too long by another process is transient (the next call may
    succeed); a corrupt database, a read-only file or a missing directory is
    not, and the caller stops using the store.
    """
    if isinstance(error, diskcache.Timeout):
        return False
    if isinstance(error, sqlite3.OperationalError):
        text = str(error)
        return "locked" not in text and "busy" not in text
    return isinstance(error, (OSError, sqlite3.Error))


# The errors a diskcache store (or the shared state, state.backend redis)
# can raise for reasons of its own (disk, database, network, contention), as
# opposed to bugs in the caller.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    sqlite3.Error,
    diskcache.Timeout,
    SharedStateError,
)


def reason_here(marked: tuple[int, str] | None) -> str | None:
    """The reason of a (pid, reason) mark, if this process set it.

    A child after fork inherits its parent's marks but tries the store for
    itself, so a mark counts only in the process that made it.
    """
    if marked is not None and marked[0] == os.getpid():
        return marked[1]
    return None


def make_private_dir(path: Path) -> None:
    """Create `path` and any missing parents with mode 0700.

    An existing directory that this user owns is tightened to 0700: answers
    and breaker state are nobody else's business.
    """
    missing = []
    cursor = path
    while not cursor.exists():
        missing.append(cursor)
        if cursor.parent == cursor:
            break
        cursor = cursor.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)

    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)


class PrivateDisk(diskcache.Disk):
    """diskcache's Disk, writing large values to 0600 files in 0700 directories.

    diskcache stores values over disk_min_file_size (32 KiB) as files that it
    creates with the process umask, usually 0644.
    """

    def _write(
        self,
        full_path: str,
        iterator: Any,
        mode: str,
        encoding: str | None = None,
    ) -> int:
        with _create_private(full_path, mode, encoding) as writer:
            size = 0
            for chunk in iterator:
                size += len(chunk)
                writer.write(chunk)
            return size


def _create_private(full_path: str, mode: str, encoding: str | None) -> Any:
    """Open a new value file 0600, making its two directory levels 0700.

    Values live in ab/cd/name.val; makedirs would give the upper level the
    umask's mode, so each level is made here. Another process may remove an
    empty level between our mkdir and our open: diskcache's own _write
    retries the same way.
    """
    directory = os.path.dirname(full_path)
    levels = (os.path.dirname(directory), directory)
    for attempt in range(1, 11):
        for level in levels:
            with contextlib.suppress(OSError):
                os.mkdir(level, 0o700)
        try:
            return open(full_path, mode, encoding=encoding, opener=_open_private)
        except OSError:
            if attempt == 10:
                raise
    raise AssertionError("unreachable")


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def open_private_cache(directory: Path, **settings: Any) -> diskcache.Cache:
    """Open a diskcache.Cache that only this user can read.

    Raises OSError or sqlite3.Error when the directory cannot hold a store.
    """
    make_private_dir(directory)

    # SQLite creates the database with the umask (0644) and gives its -wal
    # and -shm files the database's mode; an empty file is a valid database.
    database = directory / DATABASE_NAME
    os.close(os.open(database, os.O_RDWR | os.O_CREAT, 0o600))

    return diskcache.Cache(str(directory), timeout=STORE_TIMEOUT, disk=PrivateDisk, **settings)


class ProcessLocalCache:
    """A diskcache.Cache opened on first use in each process.

    A Cache inherited over fork carries the parent's transaction state; the
    child opens its own and leaves the inherited one alone.
    """

    def __init__(self, directory: Path, **settings: Any) -> None:
        self.directory = directory
        self._settings = settings

        # (pid, cache) as one tuple, so a thread never pairs one process's
        # pid with another's cache.
        self._opened: tuple[int, diskcache.Cache] | None = None

    def get(self) -> diskcache.Cache:
        """Return this process's Cache, opening it if needed (may raise)."""
        opened = self._opened
        pid = os.getpid()
        if opened is not None and opened[0] == pid:
            return opened[1]

        cache = open_private_cache(self.directory, **self._settings)
        self._opened = (pid, cache)
        return cache

    def close(self) -> None:
        """Close this process's connection, if it opened one."""
        opened = self._opened
        self._opened = None
        if opened is not None and opened[0] == os.getpid():
            opened[1].close()


# ---------------------------------------------------------------------------
# The response cache


class ResponseCache:
    """Answers of successful calls, by cache_key(), shared through a directory.

    `settings` is the cache section of the configuration, or anything with
    its attributes: enabled, dir, ttl, size_limit, eviction_policy. The
    directory is settings.dir, else STATE_DIR/cache; with neither, caching is
    off. Values are any picklable object (runner.Response in practice).

    Hits and misses are counted by diskcache in the store itself, so
    `ralph-supervisor cache stats` run in another process reads the totals of
    every process that used the directory.
    """

    def __init__(self, settings: Any, state_dir: Path | None) -> None:
        policy = settings.eviction_policy
        if policy not in EVICTION_POLICIES:
            allowed = ", ".join(EVICTION_POLICIES)
            raise ValueError(f"cache.eviction_policy: expected one of {allowed}, got {policy!r}")

        if settings.dir is not None:
            directory: Path | None = Path(settings.dir).expanduser()
        elif state_dir is not None:
            directory = Path(state_dir) / "cache"
        else:
            directory = None

        self.enabled = bool(settings.enabled) and directory is not None
        self.directory = directory
        self.ttl = float(settings.ttl)
        self._store: ProcessLocalCache | None = None
        if self.enabled and directory is not None:
            self._store = ProcessLocalCache(
                directory,
                size_limit=int(settings.size_limit),
                eviction_policy=policy,
                # diskcache reads this per Cache object at open, not from the
                # database, so every process must ask for it to be counted.
                statistics=1,
            )

        # Why caching is off in this process, and in which process that was
        # found: a child after fork tries the directory again for itself.
        self._broken: tuple[int, str] | None = None

        # state.backend redis: the store every host shares, while it answers.
        self._state_key = state_dir_key(state_dir)
        self._wanted = bool(settings.enabled)
        self._shared_store: Any = None
        self._shared_of: Any = None

    @staticmethod
    def key(
        *,
        prompt: str,
        argv: Sequence[str],
        model: str | None,
        cwd: str | None,
        agent: str,
    ) -> str:
        """cache_key(), for callers that hold only the cache."""
        return cache_key(prompt=prompt, argv=argv, model=model, cwd=cwd, agent=agent)

    @property
    def broken_reason(self) -> str | None:
        """Why caching stopped in this process, or None while it works."""
        return reason_here(self._broken)

    def get(self, key: str, *, wait: bool = True) -> Any | None:
        """Return the stored answer for `key`, or None. Never raises.

        With state.backend redis, a call another host is making now is waited
        for (up to adapter.timeout) and its answer returned; wait=False looks
        once and never blocks, for callers that must not (Supervisor.submit).
        """
        shared = self._shared()
        if shared is not None:
            try:
                return shared.get(key, wait=wait)
            except SharedStateError:
                pass  # Redis went away: this host's own cache answers.

        store = self._open()
        if store is None:
            return None

        try:
            value = store.get(key, default=_MISSING)
        except STORE_ERRORS as error:
            self._store_failed(error, "read")
            return None
        except Exception as error:
            # The entry no longer unpickles (the Response class changed in
            # an upgrade): drop it and call the agent instead.
            log.warning(
                "dropping unreadable cache entry %s: %s: %s",
                key[:12],
                type(error).__name__,
                error,
                extra={"cache_key": key},
            )
            with contextlib.suppress(*STORE_ERRORS):
                store.delete(key)
            return None

        return None if value is _MISSING else value

    def put(self, key: str, response: Any, *, complete: bool = True) -> None:
        """Store `response` under `key` for cache.ttl seconds. Never raises.

        complete=False (a partial answer, a failed call) stores nothing: the
        caller says what a success is, this refuses to keep anything less.
        """
        if not complete:
            return
        shared = self._shared()
        if shared is not None:
            try:
                shared.put(key, response)
                return
            except SharedStateError:
                pass

        store = self._open()
        if store is None:
            return

        try:
            store.set(key, response, expire=self.ttl)
        except STORE_ERRORS as error:
            self._store_failed(error, "write")
        except Exception as error:
            log.warning(
                "cannot cache the answer %s: %s: %s",
                key[:12],
                type(error).__name__,
                error,
                extra={"cache_key": key},
            )

    def stats(self) -> dict[str, Any]:
        """Entries, size and hit counts of the store, across all processes.

        entries counts expired entries that prune() has not removed yet.
        hit_ratio is None before the first lookup.
        """
        result: dict[str, Any] = {
            "enabled": self.enabled,
            "directory": str(self.directory) if self.directory else None,
            "entries": 0,
            "size_bytes": 0,
            "hits": 0,
            "misses": 0,
            "hit_ratio": None,
            "broken": self.broken_reason,
            "backend": "local",
        }
        shared = self._shared()
        if shared is not None:
            try:
                return result | shared.stats() | {"backend": "redis"}
            except SharedStateError:
                pass

        store = self._open()
        if store is None:
            return result

        try:
            # reset(name) reads a counter; stats() would also write the
            # statistics switch, which a reader has no business doing.
            hits = int(store.reset("hits"))
            misses = int(store.reset("misses"))
            result.update(
                entries=len(store),
                size_bytes=int(store.volume()),
                hits=hits,
                misses=misses,
                hit_ratio=hits / (hits + misses) if hits + misses else None,
            )
        except STORE_ERRORS as error:
            self._store_failed(error, "read statistics")
            result["broken"] = self.broken_reason
        return result

    def clear(self) -> int:
        """Remove every entry (the shared ones too, for every host); return
        how many were removed."""
        removed = 0
        shared = self._shared()
        if shared is not None:
            with contextlib.suppress(SharedStateError):
                removed += shared.clear()

        store = self._open()
        if store is None:
            return removed
        try:
            return removed + int(store.clear(retry=True))
        except STORE_ERRORS as error:
            self._store_failed(error, "clear")
            return removed

    def abandon(self, key: str) -> None:
        """The call for `key` ended without an answer to keep. Never raises.

        With state.backend redis, another host waiting for it makes the call
        now rather than when the flight's lease runs out.
        """
        shared = self._shared()
        if shared is not None:
            with contextlib.suppress(SharedStateError):
                shared.abandon(key)

    def prune(self) -> int:
        """Remove expired entries; return how many were removed."""
        store = self._open()
        if store is None:
            return 0
        try:
            return int(store.expire(retry=True))
        except STORE_ERRORS as error:
            self._store_failed(error, "prune")
            return 0

    def close(self) -> None:
        """Close this process's connection to the store (reopened on next use)."""
        if self._store is not None:
            self._store.close()

    def _shared(self) -> Any:
        """The shared response store while state.backend redis answers, or None."""
        if not self._wanted:
            return None
        state = shared_state_at(self._state_key)
        if state is None or not state.is_shared:
            return None
        if self._shared_of is not state:
            self._shared_store = state.response_store(self.ttl)
            self._shared_of = state
        return self._shared_store

    def _open(self) -> diskcache.Cache | None:
        if self._store is None or self.broken_reason is not None:
            return None
        try:
            return self._store.get()
        except STORE_ERRORS as error:
            self._disable(f"cannot open {self.directory}: {type(error).__name__}: {error}")
            return None

    def _store_failed(self, error: BaseException, action: str) -> None:
        if is_store_broken(error):
            self._disable(f"{action} failed in {self.directory}: {type(error).__name__}: {error}")
            return

        # Another process held the store longer than STORE_TIMEOUT: skip the
        # cache for this call only.
        log.info(
            "response cache busy, %s skipped: %s",
            action,
            error,
            extra={"cache_dir": str(self.directory)},
        )

    def _disable(self, reason: str) -> None:
        if self.broken_reason is not None:
            return
        self._broken = (os.getpid(), reason)
        log.warning(
            "response cache disabled in this process (calls go to the agent): %s. "
            "Fix or remove the directory, or set cache.dir, and restart.",
            reason,
            extra={"cache_dir": str(self.directory)},
        )
        with contextlib.suppress(Exception):
            self.close()


# ---------------------------------------------------------------------------
# Single-flight


class SingleFlight:
    """Join identical calls in flight: one runs, the others share its outcome.

    Blocking form: `run(key, fn)`. Event-driven form: `join_or_lead(key)`
    returns (True, future) to the first caller, which must call
    `finish(key, ...)` once the call ends; later callers get (False, the same
    future). Once finished, the key is free: the next caller leads again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, concurrent.futures.Future[Any]] = {}

    def __len__(self) -> int:
        """The number of keys in flight."""
        return len(self._flights)

    def join_or_lead(self, key: Hashable) -> tuple[bool, concurrent.futures.Future[Any]]:
        """Return (is_leader, future); the leader must call finish(key)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return False, flight
            flight = concurrent.futures.Future()
            self._flights[key] = flight
            return True, flight

    def finish(
        self,
        key: Hashable,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """End the flight of `key`: its followers get `result`, or `error` raised.

        An error that is not an Exception (KeyboardInterrupt, SystemExit)
        belongs to the leader's thread; followers see CancelledError instead.
        """
        with self._lock:
            flight = self._flights.pop(key, None)
        if flight is None:
            raise KeyError(f"no call in flight for {key!r}")

        if error is None:
            flight.set_result(result)
        elif isinstance(error, Exception):
            flight.set_exception(error)
        else:
            flight.cancel()

    def run(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Run fn() unless a call with `key` is in flight; then wait for its outcome."""
        is_leader, flight = self.join_or_lead(key)
        if not is_leader:
            result: T = flight.result()
            return result

        try:
            result = fn()
        except BaseException as error:
            self.finish(key, error=error)
            raise
        self.finish(key, result=result)
        return result
