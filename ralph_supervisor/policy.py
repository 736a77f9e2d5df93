"""The call policy shared by QChatAdapter and Supervisor.

Which failures are retried, how long to back off, and the per-agent guard:
the breaker, the rate limit and the response cache, built once from the
configuration and the state directory. The adapter applies the policy in a
plain loop; the supervisor applies the same pieces from its event loop.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_supervisor.agents import AgentProfile, CompiledPatterns, profile_for
from ralph_supervisor.breaker import Breaker
from ralph_supervisor.cache import ResponseCache, cache_key
from ralph_supervisor.errors import QChatError
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
    """What a validated call will run, before any attempt."""

    request_id: str
    prompt: str
    cwd: str | None
    deadline: float
    cache_key: str | None


class AgentGuard:
    """One agent's command line, limits, breaker, rate limit and cache."""

    def __init__(
        self,
        config: Any,
        state_dir: Path | None,
        *,
        with_cache: bool = False,
        cache: ResponseCache | None = None,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.profile: AgentProfile = profile_for(config.adapter)
        self.patterns = CompiledPatterns.of(self.profile)
        self.prompts = PromptPolicy.from_config(config)
        self.breaker = Breaker(self.profile.name, config.breaker, state_dir)
        self.limiter = RateLimiter(config.limits, state_dir, name=self.profile.name)
        if cache is None and with_cache:
            cache = ResponseCache(config.cache, state_dir)
        self.cache = cache

    @property
    def name(self) -> str:
        return self.profile.name

    def limits(self) -> Limits:
        config = self.config
        return Limits(
            buffer_size=config.performance.buffer_size,
            poll_interval=config.performance.poll_interval,
            max_output_size=config.resources.max_output_size,
            max_memory_mb=config.resources.max_memory_mb,
            kill_grace=config.adapter.kill_grace,
        )

    def plan(
        self,
        prompt: object,
        *,
        cwd: str | None,
        timeout: float | None,
        use_cache: bool,
    ) -> CallPlan:
        """Validate the prompt and fix the call's one deadline.

        The caller's timeout wins when it is shorter than adapter.timeout.
        """
        text = self.prompts.validate(prompt)
        budget = self.config.adapter.timeout
        if timeout is not None:
            budget = min(budget, timeout)

        key = None
        if use_cache and self.cache is not None and self.config.cache.enabled:
            key = cache_key(
                prompt=text,
                argv=self.profile.command,
                model=self.config.adapter.model,
                cwd=cwd,
                agent=self.profile.name,
            )
        return CallPlan(new_request_id(), text, cwd, time.monotonic() + budget, key)

    def spec(self, plan: CallPlan, *, in_worker: bool) -> CallSpec:
        argv = self.profile.command
        if self.config.adapter.model:
            argv = (*argv, "--model", self.config.adapter.model)
        return CallSpec(
            argv=argv,
            prompt=plan.prompt,
            deadline=plan.deadline,
            cwd=plan.cwd,
            limits=self.limits(),
            patterns=self.patterns,
            agent=self.profile.name,
            request_id=plan.request_id,
            die_with_parent=in_worker,
        )

    def backoff(self, attempts: int) -> float:
        adapter = self.config.adapter
        return backoff_delay(attempts, adapter.retry_delay, adapter.max_retry_delay)
