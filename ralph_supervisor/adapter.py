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
import logging
import time
from pathlib import Path
from typing import Any

from ralph_supervisor.cache import ResponseCache, SingleFlight
from ralph_supervisor.errors import CircuitOpen, QChatError
from ralph_supervisor.policy import AgentGuard, AgentSet, CallPlan
from ralph_supervisor.runner import Response, run_call

log = logging.getLogger("ralph_supervisor.adapter")


class QChatAdapter:
    """One agent call at a time per thread, guarded, retried, failed over."""

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
        self.agents = AgentSet(config, self.state_dir)

    @property
    def guard(self) -> AgentGuard:
        """The first agent: the only one without an `agents:` list."""
        return self.agents.primary

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
        plan = self.agents.plan(prompt, cwd=cwd, timeout=timeout, use_cache=False)
        return self.run_plan(plan)

    def run_plan(self, plan: CallPlan, order: list[AgentGuard] | None = None) -> Response:
        """Attempts under one deadline: retries with backoff, then failover."""
        order = order if order is not None else self.agents.order()
        position = 0
        attempts = 0
        agent_attempts = 0
        last_error: QChatError | None = None

        while position < len(order):
            guard = order[position]
            try:
                guard.breaker.check()
            except CircuitOpen:
                position, agent_attempts = position + 1, 0
                continue

            # Wait for a token first, then ask the breaker: a caller that
            # waited must not run a call after the circuit opened meanwhile.
            guard.limiter.acquire(plan.deadline)
            try:
                ticket = guard.breaker.admit(lease_seconds=plan.deadline - time.monotonic())
            except CircuitOpen:
                position, agent_attempts = position + 1, 0
                continue

            attempts += 1
            agent_attempts += 1
            try:
                response = run_call(guard.spec(plan))
            except QChatError as error:
                guard.breaker.record(ticket, error)
                self.agents.on_failure(guard, error)
                error.attempts = attempts
                last_error = error

                delay = guard.backoff(agent_attempts)
                in_time = time.monotonic() + delay < plan.deadline
                if guard.may_retry(error, agent_attempts) and in_time:
                    time.sleep(delay)
                    continue
                moving_on = self.agents.should_fail_over(error, position, order)
                if moving_on and time.monotonic() < plan.deadline:
                    log.warning(
                        "moving from %s to %s after %s",
                        guard.name,
                        order[position + 1].name,
                        error.kind,
                        extra={"agent": guard.name, "error_type": error.kind},
                    )
                    position, agent_attempts = position + 1, 0
                    continue
                raise

            guard.breaker.record(ticket, None)
            response.attempts = attempts
            return response

        raise last_error or self.agents.all_open(order)


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
        for guard in adapter.agents.guards:
            guard.cache = self.cache
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
        agents = self.adapter.agents
        plan = agents.plan(prompt, cwd=cwd, timeout=timeout, use_cache=True)
        order = agents.order()

        # The answer of the agent that would take the call now.
        lookup = agents.first_available(order) or order[0]
        key = lookup.cache_key(plan)
        if key is None:
            return self.adapter.run_plan(plan, order)

        cached = self.cache.get(key)
        if cached is not None:
            return cached.as_hit(plan.request_id)

        def call_and_store() -> Response:
            try:
                response = self.adapter.run_plan(plan, order)
            except BaseException:
                # Hosts waiting on this call's answer make the call themselves.
                self.cache.abandon(key)
                raise
            answering = agents.guard_named(response.agent) or lookup
            answering_key = answering.cache_key(plan)
            if answering_key is not None:
                self.cache.put(answering_key, response)
            if answering_key != key:
                self.cache.abandon(key)
            return response

        response: Response = self.single_flight.run(key, call_and_store)
        return response
