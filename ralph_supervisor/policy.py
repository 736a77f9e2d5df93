"""The call policy shared by QChatAdapter and Supervisor.

Which failures are retried, how long to back off, and the per-agent guard:
the breaker, the rate limit and the response cache, built once from the
configuration and the state directory. The adapter applies the policy in a
plain loop; the supervisor applies the same pieces from its event loop.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_supervisor.agents import AgentProfile, CompiledPatterns, profile_for
from ralph_supervisor.backend import open_shared_state
from ralph_supervisor.breaker import Breaker
from ralph_supervisor.cache import ResponseCache, cache_key
from ralph_supervisor.errors import CircuitOpen, QChatAuthError, QChatError
from ralph_supervisor.prompts import PromptPolicy
from ralph_supervisor.ratelimit import RateLimiter
from ralph_supervisor.runner import CallSpec, Limits

log = logging.getLogger("ralph_supervisor.policy")


def backoff_delay(
    attempt: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential, full jitter.

    Full jitter (uniform between 0 and the exponential step) spreads the
    retries of many callers that failed together, so they do not return
    together and fail together again.
    """
    step = min(cap, base * (2 ** max(attempt - 1, 0)))
    return (rng or random).uniform(0.0, step)


def may_retry(error: BaseException, attempts: int, max_retries: int) -> bool:
    """Whether a failed call gets another attempt (retries count after the first)."""
    return isinstance(error, QChatError) and error.retryable and attempts <= max_retries


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class CallPlan:
    """A validated call and its one deadline, before any attempt."""

    request_id: str
    prompt: str
    cwd: str | None
    deadline: float
    use_cache: bool
    cache_key: str | None = None


class AgentGuard:
    """One agent: its command line, limits, breaker and rate limit."""

    def __init__(
        self,
        config: Any,
        state_dir: Path | None,
        *,
        name: str | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.profile: AgentProfile = profile_for(config.adapter)
        self.name = name or self.profile.name
        self.patterns = CompiledPatterns.of(self.profile)
        self.shared = open_shared_state(config, state_dir)
        self.breaker = Breaker(self.name, config.breaker, state_dir)
        self.limiter = RateLimiter(config.limits, state_dir, name=self.name)
        self.cache = cache

    def limits(self) -> Limits:
        config = self.config
        return Limits(
            buffer_size=config.performance.buffer_size,
            poll_interval=config.performance.poll_interval,
            max_output_size=config.resources.max_output_size,
            max_memory_mb=config.resources.max_memory_mb,
            kill_grace=config.adapter.kill_grace,
        )

    def argv(self) -> tuple[str, ...]:
        argv = self.profile.command
        if self.config.adapter.model:
            argv = (*argv, "--model", self.config.adapter.model)
        return argv

    def cache_key(self, plan: CallPlan) -> str | None:
        """The key of this agent's answer to the plan, or None: not cached."""
        if not plan.use_cache or self.cache is None or not self.config.cache.enabled:
            return None
        return cache_key(
            prompt=plan.prompt,
            argv=self.argv(),
            model=self.config.adapter.model,
            cwd=plan.cwd,
            agent=self.name,
        )

    def spec(self, plan: CallPlan) -> CallSpec:
        """One attempt: this agent's timeouts, within the call's deadline.

        adapter.attempt_timeout bounds one attempt, so that an attempt that
        hangs leaves time for another before the call's deadline.
        """
        argv = self.argv()
        adapter = self.config.adapter
        budget = adapter.timeout
        if adapter.attempt_timeout is not None:
            budget = min(budget, adapter.attempt_timeout)
        deadline = min(plan.deadline, time.monotonic() + budget)
        profile = self.profile
        return CallSpec(
            argv=(*argv, "--") if profile.end_of_options else argv,
            prompt_option=profile.prompt_option,
            stdin_argv=(*argv, *profile.stdin_marker),
            prompt=plan.prompt,
            deadline=deadline,
            cwd=plan.cwd,
            limits=self.limits(),
            patterns=self.patterns,
            agent=self.name,
            request_id=plan.request_id,
        )

    def may_retry(self, error: BaseException, attempts: int) -> bool:
        return may_retry(error, attempts, self.config.adapter.max_retries)

    def backoff(self, attempts: int) -> float:
        adapter = self.config.adapter
        return backoff_delay(attempts, adapter.retry_delay, adapter.max_retry_delay)


class AgentSet:
    """The agents a call may go to, in the order the strategy gives.

    With one agent (no `agents:` list) this is just that agent. With
    several, a call goes to the first whose breaker admits it; when that
    agent fails in a way that says its service is unwell, after its own
    retries, the call moves on to the next, within the call's deadline.
    Failures that are the prompt's fault never move on.
    """

    def __init__(
        self,
        config: Any,
        state_dir: Path | None,
        *,
        with_cache: bool = False,
        cache: ResponseCache | None = None,
    ) -> None:
        if cache is None and with_cache:
            cache = ResponseCache(config.cache, state_dir)
        self.config = config
        self.cache = cache
        self.prompts = PromptPolicy.from_config(config)
        self.strategy = config.agent_strategy
        self.guards = [
            AgentGuard(agent_config, state_dir, name=name, cache=cache)
            for name, agent_config in config.agent_configs()
        ]
        self._turns = itertools.count()

    @property
    def primary(self) -> AgentGuard:
        return self.guards[0]

    def guard_named(self, name: str) -> AgentGuard | None:
        return next((guard for guard in self.guards if guard.name == name), None)

    def apply(self, config: Any) -> None:
        """Take a reloaded configuration: limits, timeouts, prompt rules.

        Breakers and rate limits keep their state; the agent list itself
        changes only with a restart.
        """
        self.config = config
        self.prompts = PromptPolicy.from_config(config)
        for guard, (_, agent_config) in zip(self.guards, config.agent_configs(), strict=False):
            guard.config = agent_config

    def plan(
        self,
        prompt: object,
        *,
        cwd: str | None,
        timeout: float | None,
        use_cache: bool,
    ) -> CallPlan:
        """Validate the prompt and fix the call's one deadline.

        Without a caller's timeout the budget is the longest agent timeout;
        each attempt is held to its own agent's timeout within it.
        """
        text = self.prompts.validate(prompt)
        budget = max(guard.config.adapter.timeout for guard in self.guards)
        if timeout is not None:
            budget = min(budget, timeout)
        return CallPlan(new_request_id(), text, cwd, time.monotonic() + budget, use_cache)

    def order(self) -> list[AgentGuard]:
        """The agents to try for one call, best first."""
        if self.strategy != "round_robin" or len(self.guards) == 1:
            return list(self.guards)
        start = next(self._turns) % len(self.guards)
        return self.guards[start:] + self.guards[:start]

    def first_available(self, order: list[AgentGuard]) -> AgentGuard | None:
        """The first agent whose breaker would admit a call now."""
        for guard in order:
            try:
                guard.breaker.check()
            except CircuitOpen:
                continue
            return guard
        return None

    def all_open(self, order: list[AgentGuard]) -> CircuitOpen:
        """The error for a call that no agent's breaker admits."""
        parts = []
        next_trials = []
        for guard in order:
            retry_at = guard.breaker.retry_at
            if retry_at is None:
                parts.append(f"{guard.name}: trial in progress")
                continue
            next_trials.append(retry_at)
            wait = max(0.0, retry_at - time.time())
            parts.append(f"{guard.name}: next trial in {wait:.0f} s")
        what = "the circuit is open" if len(order) == 1 else "every agent's circuit is open"
        return CircuitOpen(
            f"{what} ({'; '.join(parts)})",
            retry_at=min(next_trials) if next_trials else None,
        )

    def should_fail_over(self, error: BaseException, position: int, order: list[Any]) -> bool:
        """Whether a call that failed on order[position] moves on to the next."""
        unwell = isinstance(error, QChatError) and error.trips_breaker
        return unwell and position + 1 < len(order)

    def on_failure(self, guard: AgentGuard, error: BaseException) -> None:
        """An agent whose login failed is out until its breaker's trial succeeds."""
        if isinstance(error, QChatAuthError):
            guard.breaker.trip(error.kind)
