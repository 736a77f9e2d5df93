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
from dataclasses import dataclass, field, replace

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

    # How the prompt goes as an argument: after "--" (the end of options,
    # so a prompt that starts with "-" is not read as a flag), or glued to
    # an option (gemini's --prompt=...). stdin_marker ends the command line
    # when the prompt goes on stdin instead (codex reads "-" as stdin).
    end_of_options: bool = True
    prompt_option: str = ""
    stdin_marker: tuple[str, ...] = ()

    # Exit statuses that say what went wrong without any message.
    exit_codes: Mapping[int, str] = field(default_factory=dict)

    def with_command(self, command: Sequence[str]) -> AgentProfile:
        # A custom command line decides for itself how it takes its prompt.
        return replace(self, command=tuple(command), prompt_option="", stdin_marker=())

    def with_patterns(self, extra: Mapping[str, Sequence[str]]) -> AgentProfile:
        merged = {kind: tuple(self.patterns.get(kind, ())) for kind in FAILURE_KINDS}
        for kind, regexes in extra.items():
            merged[kind] = merged.get(kind, ()) + tuple(regexes)
        return replace(self, patterns=merged)


def _simulator_command() -> tuple[str, ...]:
    # The interpreter running us, so the simulator works in any virtualenv
    # even when its console script is not on PATH.
    return (sys.executable, "-m", "ralph_supervisor.simulator", "chat")


# Claude Code without a login prints "Not logged in · Please run /login" on
# stdout and exits 1; its API errors name the HTTP status.
CLAUDE_PATTERNS: Mapping[str, tuple[str, ...]] = {
    "auth": (
        r"not logged in",
        r"please run /login",
        r"invalid api key",
        r"authentication_error",
        r"oauth token (?:has )?expired",
        r"credit balance is too low",
    ),
    "throttled": (
        r"rate_limit_error",
        r"usage limit reached",
        r"API Error: 429",
    ),
    "service": (
        r"overloaded_error",
        r"API Error: 5\d\d",
        r"api_error",
    ),
}

# Gemini CLI exits 41 without credentials (naming the variables it wants)
# and 55 in a folder it does not trust, in red ANSI on stderr.
GEMINI_PATTERNS: Mapping[str, tuple[str, ...]] = {
    "auth": (
        r"please set an auth method",
        r"GEMINI_API_KEY",
        r"API key not valid",
        r"UNAUTHENTICATED",
    ),
    "throttled": (
        r"RESOURCE_EXHAUSTED",
        r"quota exceeded",
        r"status 429",
        r"rate limit",
    ),
    "service": (
        r"\bUNAVAILABLE\b",
        r"model is overloaded",
        r"status 503",
        r"INTERNAL",
    ),
}

# Codex refuses a directory that is not a trusted git repository; without a
# login it names the login command or the API key variable.
CODEX_PATTERNS: Mapping[str, tuple[str, ...]] = {
    "auth": (
        r"not logged in",
        r"codex login",
        r"OPENAI_API_KEY",
        r"401 Unauthorized",
    ),
    "throttled": (
        r"rate limit",
        r"usage limit",
        r"429 Too Many Requests",
    ),
    "service": (
        r"stream disconnected",
        r"5\d\d (?:Internal Server Error|Service Unavailable|Bad Gateway)",
    ),
}

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
    # The prompt as the last word; with no word, each reads it from stdin.
    # Each runs unattended with every tool allowed, as q's --trust-all-tools.
    # --dangerously-skip-permissions would trust every tool as q does, but
    # Claude Code refuses it to root; acceptEdits works for every user.
    "claude": AgentProfile(
        "claude",
        ("claude", "-p", "--permission-mode", "acceptEdits", "--output-format", "text"),
        CLAUDE_PATTERNS,
        pattern_streams=("stdout", "stderr"),
    ),
    "gemini": AgentProfile(
        "gemini",
        ("gemini", "--yolo"),
        GEMINI_PATTERNS,
        pattern_streams=("stdout", "stderr"),
        end_of_options=False,
        prompt_option="--prompt=",
        exit_codes={41: "auth"},
    ),
    # exec never asks for approval; the sandbox lets it write its workdir.
    "codex": AgentProfile(
        "codex",
        ("codex", "exec", "--sandbox", "workspace-write", "--skip-git-repo-check"),
        CODEX_PATTERNS,
        pattern_streams=("stdout", "stderr"),
        stdin_marker=("-",),
    ),
    # A command line of the configuration's own (adapter.command), with
    # only the failure patterns the configuration gives it.
    "custom": AgentProfile("custom", (), end_of_options=False),
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
    exit_codes: tuple[tuple[int, str], ...] = ()

    @classmethod
    def of(cls, profile: AgentProfile) -> CompiledPatterns:
        compiled = []
        for kind in FAILURE_KINDS:
            regexes = profile.patterns.get(kind, ())
            if regexes:
                joined = "|".join(f"(?:{regex})" for regex in regexes)
                compiled.append((kind, re.compile(joined, re.IGNORECASE)))
        exit_codes = tuple(sorted(profile.exit_codes.items()))
        return cls(tuple(compiled), profile.pattern_streams, exit_codes)

    def match(
        self, streams: Mapping[str, str], exit_code: int | None = None
    ) -> tuple[str, str] | None:
        """(kind, what said so) for the first failure found, or None."""
        for kind, pattern in self.by_kind:
            for stream in self.streams:
                found = pattern.search(streams.get(stream, ""))
                if found:
                    return kind, found.group(0)
        for code, kind in self.exit_codes:
            if code == exit_code:
                return kind, f"exit status {code}"
        return None
