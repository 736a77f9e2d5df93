"""Agent profiles: how to run each coding CLI, and how it says it failed.

A profile is data. The runner reads its command line and its failure
patterns; nothing else in the package knows one agent from another.

`q chat --no-interactive` exits 0 after throttling, an expired login or a
service error, and only its stderr says so. The patterns below are that
stderr's phrasing. They are searched case-insensitively in the tail of the
streams a profile names, and the configuration can add to them
(adapter.failure_patterns) without replacing them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Failure kinds, in the order they are checked: a login problem needs a
# person, so it wins over a throttling message printed beside it.
FAILURE_KINDS = ("auth", "throttled", "service")

Q_PATTERNS: Mapping[str, tuple[str, ...]] = {
    "auth": (
        r"not logged in",
        r"authentication error",
        r"\bq login\b",
        r"(?:token|session|credentials?) (?:has |have )?expired",
        r"ExpiredToken",
        r"UnauthorizedException",
    ),
    "throttled": (
        r"rate limit (?:reached|exceeded)",
        r"request quota exceeded",
        r"ThrottlingException",
        r"monthly (?:request )?limit reached",
        r"too many requests",
    ),
    "service": (
        r"having trouble responding",
        r"temporarily unavailable",
        r"ServiceUnavailable",
        r"InternalServerException",
        r"internal server error",
    ),
}


@dataclass(frozen=True)
class AgentProfile:
    """One agent CLI: its command line (without the prompt) and its failures."""

    name: str
    command: tuple[str, ...]
    patterns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    # Which output streams may carry a failure message. q keeps its answer
    # on stdout, which may legitimately talk about rate limits, so only its
    # stderr is searched.
    pattern_streams: tuple[str, ...] = ("stderr",)

    def with_command(self, command: Sequence[str]) -> AgentProfile:
        return AgentProfile(self.name, tuple(command), self.patterns, self.pattern_streams)

    def with_patterns(self, extra: Mapping[str, Sequence[str]]) -> AgentProfile:
        merged = {kind: tuple(self.patterns.get(kind, ())) for kind in FAILURE_KINDS}
        for kind, regexes in extra.items():
            merged[kind] = merged.get(kind, ()) + tuple(regexes)
        return AgentProfile(self.name, self.command, merged, self.pattern_streams)


def _simulator_command() -> tuple[str, ...]:
    # The interpreter running us, so the simulator works in any virtualenv
    # even when its console script is not on PATH.
    return (sys.executable, "-m", "ralph_supervisor.simulator", "chat")


PROFILES: Mapping[str, AgentProfile] = {
    "q": AgentProfile(
        "q",
        ("q", "chat", "--no-interactive", "--trust-all-tools"),
        Q_PATTERNS,
    ),
    "kiro": AgentProfile(
        "kiro",
        ("kiro-cli", "chat", "--no-interactive", "--trust-all-tools"),
        Q_PATTERNS,
    ),
    "sim": AgentProfile(
        "sim",
        _simulator_command() + ("--no-interactive", "--trust-all-tools"),
        Q_PATTERNS,
    ),
}

# The deployment guide's configuration file says `adapter.name: qchat`.
ALIASES: Mapping[str, str] = {"qchat": "q"}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def get_profile(name: str) -> AgentProfile:
    """The built-in profile for `name` (aliases allowed); KeyError if none."""
    return PROFILES[canonical_name(name)]


def profile_for(adapter_settings: object) -> AgentProfile:
    """The profile an adapter section selects, with its command and patterns.

    adapter.command replaces the profile's command line and keeps its
    failure patterns; adapter.failure_patterns adds to them.
    """
    profile = get_profile(str(getattr(adapter_settings, "name", "q")))

    command = getattr(adapter_settings, "command", None)
    if command:
        profile = profile.with_command(command)

    extra = getattr(adapter_settings, "failure_patterns", None)
    if extra:
        profile = profile.with_patterns(extra)

    return profile


@dataclass(frozen=True)
class CompiledPatterns:
    """A profile's patterns compiled once, picklable for the worker pipe."""

    by_kind: tuple[tuple[str, re.Pattern[str]], ...]
    streams: tuple[str, ...]

    @classmethod
    def of(cls, profile: AgentProfile) -> CompiledPatterns:
        compiled = []
        for kind in FAILURE_KINDS:
            regexes = profile.patterns.get(kind, ())
            if regexes:
                joined = "|".join(f"(?:{regex})" for regex in regexes)
                compiled.append((kind, re.compile(joined, re.IGNORECASE)))
        return cls(tuple(compiled), profile.pattern_streams)

    def match(self, streams: Mapping[str, str]) -> tuple[str, str] | None:
        """(kind, matched text) for the first failure found, or None."""
        for kind, pattern in self.by_kind:
            for stream in self.streams:
                found = pattern.search(streams.get(stream, ""))
                if found:
                    return kind, found.group(0)
        return None
