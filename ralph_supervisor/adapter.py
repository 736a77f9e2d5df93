"""The library classes: QChatAdapter (one guarded call) and CachedAdapter.

QChatAdapter runs the call in the calling thread, with the same policy as
the supervisor: validation, the breaker, the rate limit and retries with
backoff under one deadline. It is safe to share between threads. For a pool
of worker processes, use Supervisor.

CachedAdapter puts the response cache in front: a hit costs a hash and one
read, and identical calls in flight in several threads are made once.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ralph_supervisor.cache import ResponseCache, SingleFlight
from ralph_supervisor.errors import QChatError
from ralph_supervisor.policy import AgentGuard, CallPlan, may_retry
from ralph_supervisor.runner import Response, run_call


class QChatAdapter:
    """One agent call at a time per thread, guarded and retried."""

    def __init__(
        self,
        config: Any = None,
        *,
        state_dir: str | Path | None = None,
        workdir: str | None = None,
    ) -> None:
        if config is None:
            from ralph_supervisor.config import load_config

            config = load_config()
        self.config = config
        self.state_dir = Path(state_dir) if state_dir else config.state_dir_for(workdir)
        self.guard = AgentGuard(config, self.state_dir)

    @property
    def agent(self) -> str:
        return self.guard.name

    def execute(
        self,
        prompt: str,
        *,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Run the prompt; return a Response or raise a QChatError."""
        plan = self.guard.plan(prompt, cwd=cwd, timeout=timeout, use_cache=False)
        return self.run_plan(plan)

    def run_plan(self, plan: CallPlan) -> Response:
        """Attempts under one deadline, with backoff between them."""
        attempts = 0
        while True:
            ticket = self.guard.breaker.admit(lease_seconds=plan.deadline - time.monotonic())
            try:
                self.guard.limiter.acquire(plan.deadline)
            except QChatError:
                self.guard.breaker.release(ticket)
                raise

            attempts += 1
            try:
                response = run_call(self.guard.spec(plan, in_worker=False))
            except QChatError as error:
                self.guard.breaker.record(ticket, error)
                error.attempts = attempts
                delay = self.guard.backoff(attempts)
                retry = may_retry(error, attempts, self.config.adapter.max_retries)
                if not retry or time.monotonic() + delay >= plan.deadline:
                    raise
                time.sleep(delay)
                continue

            self.guard.breaker.record(ticket, None)
            response.attempts = attempts
            return response


class CachedAdapter:
    """An adapter with the response cache in front of it.

    `cache` is a path (a cache directory), a diskcache.Cache, a
    ResponseCache, or None for cache.dir of the adapter's configuration.
    """

    def __init__(self, adapter: QChatAdapter, cache: Any = None) -> None:
        self.adapter = adapter
        settings = adapter.config.cache
        if isinstance(cache, ResponseCache):
            self.cache = cache
        else:
            if cache is not None:
                # A path, or a diskcache.Cache: this process opens its own
                # connection to that directory (a Cache must not cross a fork).
                location = getattr(cache, "directory", cache)
                settings = dataclasses.replace(settings, dir=str(location), enabled=True)
            self.cache = ResponseCache(settings, adapter.state_dir)
        adapter.guard.cache = self.cache
        self.single_flight = SingleFlight()

    @property
    def config(self) -> Any:
        return self.adapter.config

    def execute(
        self,
        prompt: str,
        *,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> Response:
        plan = self.adapter.guard.plan(prompt, cwd=cwd, timeout=timeout, use_cache=True)
        key = plan.cache_key
        if key is None:
            return self.adapter.run_plan(plan)

        cached = self.cache.get(key)
        if cached is not None:
            return cached.as_hit(plan.request_id)

        def call_and_store() -> Response:
            response = self.adapter.run_plan(plan)
            self.cache.put(key, response)
            return response

        response: Response = self.single_flight.run(key, call_and_store)
        return response
