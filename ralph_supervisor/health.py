"""What /health says: the status and its reasons, from the supervisor's stats.

    healthy     workers up, every breaker closed           200
    degraded    still serving, but something is wrong      503
                (an agent's breaker open or on trial, an expired login while
                another agent serves, shared state unavailable)
    unhealthy   not serving: draining, no live worker,     503
                restart storm, every agent's breaker open

The reasons are written for the operator who reads them at 3 a.m.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"


def assess(stats: Mapping[str, Any], *, now: float | None = None) -> tuple[str, list[str]]:
    """(status, reasons) for a Supervisor.stats() dictionary."""
    now = time.time() if now is None else now
    reasons: list[str] = []
    unhealthy = False

    if stats.get("closing"):
        unhealthy = True
        reasons.append("draining: finishing the calls in flight, then stopping")
    elif stats.get("workers_alive", 0) == 0:
        unhealthy = True
        reasons.append("no live worker")
    if stats.get("intensity_exceeded"):
        unhealthy = True
        reasons.append("restart intensity exceeded: workers keep dying (supervisor.max_restarts)")

    agents = stats.get("agents") or []
    closed = 0
    for agent in agents:
        reason = _agent_reason(agent, now)
        if reason is None:
            closed += 1
        else:
            reasons.append(reason)
    if agents and closed == 0:
        unhealthy = True

    shared = stats.get("shared_state")
    if shared and not shared.get("ok", True):
        reasons.append(f"degraded: shared state unavailable ({shared.get('reason')})")

    if unhealthy:
        return UNHEALTHY, reasons
    return (DEGRADED if reasons else HEALTHY), reasons


def _agent_reason(agent: Mapping[str, Any], now: float) -> str | None:
    breaker = agent.get("breaker") or {}
    state = breaker.get("state", "closed")
    name = agent.get("name", "?")
    if state == "closed":
        return None

    if breaker.get("last_error_kind") == "auth_error":
        return f"login required: agent {name} is not logged in (its breaker is {state})"
    if state == "half-open":
        return f"breaker half-open: agent {name} is on its trial call"

    retry_at = breaker.get("retry_at")
    if retry_at is None:
        return f"breaker open: agent {name}"
    wait = max(0.0, retry_at - now)
    return f"breaker open: agent {name}, next trial in {wait:.0f} s"
