"""Where the state shared between supervisors lives: this host, or Redis.

The breaker, the rate limit and the response cache keep their state in the
state directory, shared by the processes of one host (state.backend local,
the default). With state.backend redis the same three are shared by every
host that points at one Redis: the agent's quota belongs to the account, not
to a host.

    AgentGuard --open_shared_state(config, state_dir)--> SharedState
                                                          |  registered
    Breaker, RateLimiter, ResponseCache                   |  per state dir
        --shared_state_at(state_dir_key(state_dir))-------+
        is_shared?  yes: the Redis storage / bucket / store (redis_backend)
                    no:  the state directory, as with state.backend local

Nothing is passed through the constructors: the three look the shared state
up by their state directory at each use, so a cache built before the guard
(or by CachedAdapter) finds it too, and the callers did not change.

When Redis is unreachable or slow, `is_shared` turns false for that host
(one warning, a metric hook, health() says why) and the three fall back to
the state directory until a background reconnection succeeds. No call fails
or waits on Redis for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "BACKENDS",
    "LocalState",
    "SharedState",
    "SharedStateBusy",
    "SharedStateError",
    "SharedStateUnavailable",
    "open_shared_state",
    "shared_state_at",
    "shared_state_for",
    "state_dir_key",
]

BACKENDS = ("local", "redis")

# Called with (degraded, reason) when the shared state goes away or comes
# back: the supervisor can export it as a gauge.
ChangeHook = Callable[[bool, "str | None"], None]


class SharedStateError(Exception):
    """The shared state could not do what was asked; local state takes over."""


class SharedStateUnavailable(SharedStateError):
    """Redis is unreachable, slow or refusing: this host uses local state."""


class SharedStateBusy(SharedStateError):
    """Another host held a shared lock for too long; this one action goes
    ahead without it, as with a busy state directory."""


class SharedState:
    """The state directory only: nothing is shared beyond this host.

    The interface every backend offers. The factories return None when the
    caller should use its state directory.
    """

    backend = "local"

    # A hook for metrics; see ChangeHook.
    on_change: ChangeHook | None = None

    @property
    def is_shared(self) -> bool:
        """Whether state is shared beyond this host right now."""
        return False

    @property
    def degraded_reason(self) -> str | None:
        """Why this host fell back to local state, or None."""
        return None

    @property
    def degraded(self) -> bool:
        return self.degraded_reason is not None

    def health(self) -> tuple[bool, str | None]:
        """(ok, reason) for a health check: reason says what is wrong."""
        return True, None

    def stats(self) -> dict[str, Any]:
        return {"backend": self.backend, "shared": False, "degraded": None}

    def circuit_storage(self, name: str, clock: Callable[[], float]) -> Any | None:
        """A pybreaker storage for breaker `name`, or None: use local."""
        return None

    def token_bucket(self, name: str, rate: float, capacity: float) -> Any | None:
        """A token bucket for rate limit `name`, or None: use local."""
        return None

    def response_store(self, ttl: float) -> Any | None:
        """A response store with entries kept `ttl` seconds, or None: use local."""
        return None

    def close(self) -> None:
        """Stop background work and close connections."""


class LocalState(SharedState):
    """state.backend local."""


# ---------------------------------------------------------------------------
# One shared state per state directory, per process.

_registry: dict[str, SharedState] = {}
_registry_lock = threading.Lock()


def _renew_registry_lock() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()


# A lock held by another thread of the parent at fork would never be freed.
os.register_at_fork(after_in_child=_renew_registry_lock)


def state_dir_key(state_dir: str | os.PathLike[str] | None) -> str:
    """The registry's key for a state directory ("" for none)."""
    return "" if state_dir is None else os.path.abspath(os.fspath(state_dir))


def shared_state_for(state_dir: str | os.PathLike[str] | None) -> SharedState | None:
    """The shared state opened for `state_dir` in this process, or None."""
    return _registry.get(state_dir_key(state_dir))


def shared_state_at(key: str) -> SharedState | None:
    """shared_state_for() by a key from state_dir_key(): one dict lookup, for
    the per-call paths."""
    return _registry.get(key)


def open_shared_state(config: Any, state_dir: Path | None) -> SharedState:
    """Open (once per process and state directory) the backend config.state names.

    A second call with the same settings returns the same object; with other
    settings (a changed redis_url) the old one is closed and replaced.
    Raises ValueError when the redis backend cannot even be set up: the
    redis package is missing, or the password file cannot be read. An
    unreachable Redis is no error here: the state starts degraded.
    """
    settings = config.state
    key = state_dir_key(state_dir)
    with _registry_lock:
        current = _registry.get(key)
        if current is not None and getattr(current, "settings", None) == settings:
            return current
        if settings.backend == "local" and isinstance(current, LocalState):
            return current

        if settings.backend == "redis":
            # Imported here: the redis package is an optional extra.
            from ralph_supervisor.redis_backend import RedisState

            opened: SharedState = RedisState(
                settings,
                flight_lease=float(config.adapter.timeout),
                host_id=f"{os.uname().nodename}:{key}",
            )
        else:
            opened = LocalState()

        if current is not None:
            current.close()
        _registry[key] = opened
        return opened


def close_shared_state(state_dir: str | os.PathLike[str] | None) -> None:
    """Close and forget the shared state of `state_dir` (tests, shutdown)."""
    with _registry_lock:
        current = _registry.pop(state_dir_key(state_dir), None)
    if current is not None:
        current.close()
