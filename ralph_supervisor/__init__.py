"""ralph-supervisor: a production runtime for Ralph loops on the Q Developer CLI.

The library's faces: load_config, QChatAdapter (one guarded call),
CachedAdapter (the cache in front of it), Supervisor (a pool of worker
processes), Response, and the exception tree of ralph_supervisor.errors.

The names are imported on first use: the simulator and the workers import
this package too, and must not pay for the whole library at every start.
"""

from __future__ import annotations

# typing imports re and more; mypy treats this name as true all the same.
TYPE_CHECKING = False

__version__ = "0.1.0"

_ERRORS = (
    "CircuitOpen",
    "ConfigError",
    "MemoryLimitExceeded",
    "OutputTooLarge",
    "PromptRejected",
    "QChatAuthError",
    "QChatError",
    "QChatProcessError",
    "QChatServiceError",
    "QChatThrottled",
    "QChatTimeout",
    "QueueFull",
    "SupervisorClosed",
    "WorkerLost",
)

_HOMES = {
    "CachedAdapter": "ralph_supervisor.adapter",
    "QChatAdapter": "ralph_supervisor.adapter",
    "Config": "ralph_supervisor.config",
    "load_config": "ralph_supervisor.config",
    "Response": "ralph_supervisor.runner",
    "Supervisor": "ralph_supervisor.supervisor",
    **dict.fromkeys(_ERRORS, "ralph_supervisor.errors"),
}

__all__ = [
    "CachedAdapter",
    "CircuitOpen",
    "Config",
    "ConfigError",
    "MemoryLimitExceeded",
    "OutputTooLarge",
    "PromptRejected",
    "QChatAdapter",
    "QChatAuthError",
    "QChatError",
    "QChatProcessError",
    "QChatServiceError",
    "QChatThrottled",
    "QChatTimeout",
    "QueueFull",
    "Response",
    "Supervisor",
    "SupervisorClosed",
    "WorkerLost",
    "__version__",
    "load_config",
]


def __getattr__(name: str) -> object:
    import importlib

    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ralph_supervisor' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from ralph_supervisor.adapter import CachedAdapter, QChatAdapter
    from ralph_supervisor.config import Config, load_config
    from ralph_supervisor.errors import (
        CircuitOpen,
        ConfigError,
        MemoryLimitExceeded,
        OutputTooLarge,
        PromptRejected,
        QChatAuthError,
        QChatError,
        QChatProcessError,
        QChatServiceError,
        QChatThrottled,
        QChatTimeout,
        QueueFull,
        SupervisorClosed,
        WorkerLost,
    )
    from ralph_supervisor.runner import Response
    from ralph_supervisor.supervisor import Supervisor
