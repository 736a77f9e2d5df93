"""The configuration: built-in defaults, the YAML file, the environment, overrides.

This module owns every setting. Its name, check, default, environment variable
and one-line doc are written once, in the section dataclasses below, and that
one schema drives validation, the environment mapping, `config show`
(describe) and the documented example file (render_example, which is what
config/qchat.yaml holds).

    defaults  <  YAML file  <  environment  <  overrides
    "default"    "FILE:LINE"   "env NAME"      "override"

Each layer is checked on its own, so a bad value in the file is reported even
when the environment overrides it: `config validate` answers for the file.
Every problem is collected, and one ConfigError carries them all.

To add a setting, add a field to its section with setting(); to add a
section, write its dataclass and add a field for it to Config.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import shlex
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import yaml

from ralph_supervisor.errors import ConfigError

__all__ = [
    "AGENT_ALIASES",
    "AGENT_NAMES",
    "FAILURE_KINDS",
    "SETTINGS",
    "Config",
    "SchemaRow",
    "Setting",
    "TaskConfig",
    "describe",
    "ensure_private_dir",
    "load_config",
    "parse_flag",
    "render_example",
    "schema_rows",
]

# The agent profiles adapter.name may pick. "qchat" is the deployment guide's
# name for q; agents.py gets the canonical one from Config.agent_name.
AGENT_NAMES = ("q", "qchat", "kiro", "sim", "claude", "gemini", "codex", "custom")
AGENT_STRATEGIES = ("failover", "round_robin")

# What an entry of `agents:` may set, beside its name and profile: the
# adapter keys it names directly, and its own breaker and limits sections.
AGENT_ADAPTER_KEYS = (
    "command",
    "model",
    "timeout",
    "max_retries",
    "retry_delay",
    "max_retry_delay",
    "kill_grace",
    "attempt_timeout",
    "failure_patterns",
)
AGENT_SECTIONS = ("breaker", "limits")
AGENT_ALIASES = {"qchat": "q"}

FAILURE_KINDS = ("throttled", "auth", "service")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EVICTION_POLICIES = (
    "least-recently-stored",
    "least-recently-used",
    "least-frequently-used",
    "none",
)

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
NULL_WORDS = frozenset({"null", "none", "~"})

# A configuration file is a page of settings. Anything larger is the wrong
# file, and refusing it early keeps a stray multi-gigabyte path from eating
# memory before the YAML parser even starts.
MAX_FILE_BYTES = 1024 * 1024

# Sizes and counts end up in C calls (os.read, queue sizes); durations end up
# in waits, and threading refuses waits longer than TIMEOUT_MAX.
MAX_INT = 2**63 - 1
MAX_SECONDS = threading.TIMEOUT_MAX

DEFAULT_STATE_DIR = Path("~/.local/state/ralph-supervisor")

SOURCE_DEFAULT = "default"
SOURCE_OVERRIDE = "override"


# ---------------------------------------------------------------------------
# Checks: each takes a raw value (from YAML, from Python, or parsed from an
# environment variable's text) and returns the value to store, or raises
# Mismatch saying what it expected.


class Mismatch(Exception):
    """A value failed its check: what was expected, and where inside it."""

    def __init__(self, expected: str, value: Any, where: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.value = value
        self.where = where


class Check:
    """Turns a raw value into the stored one, or raises Mismatch."""

    expected = "a value"

    # Whether a string is this setting's value, so that "null" in an
    # environment variable is a name rather than "no value".
    takes_text = False

    def __call__(self, value: Any) -> Any:
        raise NotImplementedError

    def from_text(self, text: str) -> Any:
        """Read an environment variable's text as a value for __call__."""
        return text


class Integer(Check):
    def __init__(self, minimum: int = 1, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = MAX_INT if maximum is None else maximum
        self.bound = "" if maximum is not None else f" no larger than {MAX_INT}"
        if maximum is not None:
            self.expected = f"an integer from {minimum} to {maximum}"
        elif minimum == 1:
            self.expected = "a positive integer"
        else:
            self.expected = f"an integer >= {minimum}"

    def __call__(self, value: Any) -> Any:
        # bool is an int subclass, but `true` is never meant as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise Mismatch(self.expected, value)
        if value < self.minimum:
            raise Mismatch(self.expected, value)
        if value > self.maximum:
            raise Mismatch(self.expected + self.bound, value)
        return value

    def from_text(self, text: str) -> Any:
        try:
            return int(text.strip())
        except ValueError:
            raise Mismatch(self.expected, text) from None


class Number(Check):
    def __init__(self, *, positive: bool, seconds: bool = False) -> None:
        self.positive = positive
        self.maximum = MAX_SECONDS if seconds else math.inf
        noun = "number of seconds" if seconds else "number"
        self.expected = f"a positive {noun}" if positive else f"a {noun} >= 0"

    def __call__(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Mismatch(self.expected, value)
        try:
            number = float(value)
        except OverflowError:
            raise Mismatch(self.expected, value) from None

        # YAML reads 1e400 as inf; inf and nan are never meant.
        if not math.isfinite(number) or number < 0 or (self.positive and number == 0):
            raise Mismatch(self.expected, value)
        if number > self.maximum:
            raise Mismatch(f"{self.expected} no larger than {self.maximum:.0f}", value)
        return number

    def from_text(self, text: str) -> Any:
        try:
            return float(text.strip())
        except ValueError:
            raise Mismatch(self.expected, text) from None


class Seconds(Number):
    def __init__(self, *, positive: bool) -> None:
        super().__init__(positive=positive, seconds=True)


class Flag(Check):
    expected = "true or false"

    def __call__(self, value: Any) -> Any:
        # YAML has real booleans; 1 or "yes" in quotes is a mistake there.
        if not isinstance(value, bool):
            raise Mismatch(self.expected, value)
        return value

    def from_text(self, text: str) -> Any:
        try:
            return parse_flag(text)
        except ValueError:
            raise Mismatch("a boolean: 1/0, true/false, yes/no or on/off", text) from None


class Text(Check):
    takes_text = True

    def __init__(self, expected: str = "a non-empty string") -> None:
        self.expected = expected

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise Mismatch(self.expected, value)
        check_clean_text(value, self.expected)
        return value


class RedisUrl(Text):
    """A URL the redis client opens: redis://, rediss:// (TLS) or unix://."""

    schemes = ("redis", "rediss", "unix")

    def __init__(self) -> None:
        super().__init__("a redis://, rediss:// or unix:// URL")

    def __call__(self, value: Any) -> Any:
        value = super().__call__(value)
        scheme, _, rest = value.partition("://")
        if scheme.lower() not in self.schemes or not rest:
            raise Mismatch(self.expected, value)
        return value


class Choice(Check):
    takes_text = True

    def __init__(self, choices: Sequence[str], *, upper: bool = False) -> None:
        self.choices = tuple(choices)
        self.upper = upper
        self.expected = "one of " + ", ".join(self.choices)

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            word = value.strip()
            word = word.upper() if self.upper else word.lower()
            if word in self.choices:
                return word
        raise Mismatch(self.expected, value)


class LogFormat(Check):
    expected = "json, text, or a logging format string"
    takes_text = True

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            raise Mismatch(self.expected, value)
        if value.strip().lower() in ("json", "text"):
            return value.strip().lower()

        check_clean_text(value, self.expected)
        try:
            logging.Formatter(value, validate=True)

            # validate finds no fields; a stray "%" shows only when used.
            # Fields of our own (request_id) are fine, so any name will do.
            value % _AnyFields()
        except (ValueError, TypeError) as error:
            raise Mismatch(f"{self.expected} ({error})", value) from None
        return value


class _AnyFields(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        return 0


class RuleLimit(Integer):
    """A count that a rule stops at; 0 turns the rule off."""

    def __init__(self, minimum: int = 1) -> None:
        super().__init__(minimum=0)
        self.least = minimum
        self.expected = f"0 (off) or an integer >= {minimum}"

    def __call__(self, value: Any) -> Any:
        value = super().__call__(value)
        if 0 < value < self.least:
            raise Mismatch(self.expected, value)
        return value


class Ratio(Number):
    """A fraction: above 0, at most 1."""

    def __init__(self) -> None:
        super().__init__(positive=True)
        self.expected = "a number above 0 and at most 1"

    def __call__(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Mismatch(self.expected, value)
        if not 0 < value <= 1:  # nan fails this too
            raise Mismatch(self.expected, value)
        return float(value)


class Nullable(Check):
    def __init__(self, inner: Check) -> None:
        self.inner = inner
        self.expected = f"{inner.expected} or null"
        self.takes_text = inner.takes_text

    def __call__(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            return self.inner(value)
        except Mismatch as mismatch:
            if mismatch.where or mismatch.expected != self.inner.expected:
                raise
            raise Mismatch(self.expected, value) from None

    def from_text(self, text: str) -> Any:
        if not self.takes_text and text.strip().lower() in NULL_WORDS:
            return None
        return self.inner.from_text(text)


class Command(Check):
    expected = "a list of words or a command line"
    takes_text = True

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            try:
                words = shlex.split(value)
            except ValueError as error:
                expected = f"a command line with balanced quotes ({error})"
                raise Mismatch(expected, value) from None
        elif isinstance(value, list | tuple) and all(isinstance(w, str) for w in value):
            words = list(value)
        else:
            raise Mismatch(self.expected, value)

        if not words:
            raise Mismatch("a non-empty command", value)
        for word in words:
            check_clean_text(word, self.expected)
        return tuple(words)


class Patterns(Check):
    expected = "a list of regular expressions"

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise Mismatch(self.expected, value)

        for index, pattern in enumerate(value):
            where = f"[{index}]"

            # An empty pattern matches everything: as a blocked pattern it
            # would reject every prompt.
            if not isinstance(pattern, str) or not pattern:
                raise Mismatch("a non-empty regular expression", pattern, where)
            check_clean_text(pattern, "a regular expression", where)
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError, ValueError) as error:
                raise Mismatch(f"a valid regular expression ({error})", pattern, where) from None

        return tuple(value)


class PatternsByKind(Check):
    expected = "a mapping of failure kind to a list of regular expressions"

    def __init__(self) -> None:
        self.patterns = Patterns()

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise Mismatch(self.expected, value)

        chosen: dict[str, tuple[str, ...]] = {}
        for kind, patterns in value.items():
            if kind not in FAILURE_KINDS:
                raise Mismatch("a failure kind: " + ", ".join(FAILURE_KINDS), kind)
            try:
                chosen[kind] = self.patterns(patterns)
            except Mismatch as mismatch:
                where = f".{kind}{mismatch.where}"
                raise Mismatch(mismatch.expected, mismatch.value, where) from None

        return MappingProxyType(chosen)


class TaskList(Check):
    """tasks: checked here; prompt_file gets loop.prompt_file later."""

    expected = "a list of tasks, each a mapping with a workdir"
    keys = ("name", "workdir", "prompt_file")

    def __init__(self) -> None:
        self.path = Text("a path")
        self.name = Text("a non-empty name")

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise Mismatch(self.expected, value)

        tasks: list[dict[str, Any]] = []
        first_index: dict[str, int] = {}
        for index, entry in enumerate(value):
            task = self.check_task(entry, f"[{index}]")
            if task["name"] in first_index:
                expected = f"a unique name (tasks[{first_index[task['name']]}] has it)"
                raise Mismatch(expected, task["name"], f"[{index}].name")
            first_index[task["name"]] = index
            tasks.append(task)

        return tuple(tasks)

    def check_task(self, entry: Any, where: str) -> dict[str, Any]:
        if isinstance(entry, TaskConfig):
            entry = dataclasses.asdict(entry)
        if not isinstance(entry, Mapping):
            raise Mismatch("a mapping with workdir, name, prompt_file", entry, where)
        for key in entry:
            if key not in self.keys:
                raise Mismatch("only keys " + ", ".join(self.keys), key, where)

        workdir = self.check_part(self.path, entry.get("workdir"), f"{where}.workdir")
        name = entry.get("name")
        if name is None:
            name = default_task_name(workdir)
        name = self.check_part(self.name, name, f"{where}.name")
        prompt_file = entry.get("prompt_file")
        if prompt_file is not None:
            prompt_file = self.check_part(self.path, prompt_file, f"{where}.prompt_file")

        return {"name": name, "workdir": workdir, "prompt_file": prompt_file}

    @staticmethod
    def check_part(check: Check, value: Any, where: str) -> Any:
        try:
            return check(value)
        except Mismatch as mismatch:
            raise Mismatch(mismatch.expected, mismatch.value, where) from None


class AgentList(Check):
    """agents: an ordered list of agent entries, or {strategy, list}.

    Each entry's values are checked by the very settings they stand for
    (adapter.timeout, breaker.fail_max, ...), so an agent cannot hold a
    value its adapter section would refuse.
    """

    expected = "a list of agents, or a mapping with strategy and list"

    def __init__(self) -> None:
        self.name = Text("a non-empty name")
        self.strategy = Choice(AGENT_STRATEGIES)

    def __call__(self, value: Any) -> Any:
        strategy = AGENT_STRATEGIES[0]
        entries = value
        where = ""
        if isinstance(value, Mapping):
            for key in value:
                if key not in ("strategy", "list"):
                    raise Mismatch("only keys strategy, list", key)
            strategy = TaskList.check_part(
                self.strategy, value.get("strategy", strategy), ".strategy"
            )
            entries = value.get("list", [])
            where = ".list"
        if not isinstance(entries, list | tuple):
            raise Mismatch(self.expected, value)

        agents: list[dict[str, Any]] = []
        first_index: dict[str, int] = {}
        for index, entry in enumerate(entries):
            agent = self.check_agent(entry, f"{where}[{index}]")
            if agent["name"] in first_index:
                expected = f"a unique name (agents[{first_index[agent['name']]}] has it)"
                raise Mismatch(expected, agent["name"], f"{where}[{index}].name")
            first_index[agent["name"]] = index
            agents.append(agent)

        return MappingProxyType({"strategy": strategy, "list": tuple(agents)})

    def check_agent(self, entry: Any, where: str) -> dict[str, Any]:
        if not isinstance(entry, Mapping):
            raise Mismatch("a mapping with a name", entry, where)

        name = TaskList.check_part(self.name, entry.get("name"), f"{where}.name")
        profile = entry.get("profile", name if name in AGENT_NAMES else None)
        profile = TaskList.check_part(Choice(AGENT_NAMES), profile, f"{where}.profile")
        agent: dict[str, Any] = {"name": name, "profile": AGENT_ALIASES.get(profile, profile)}

        for key, value in entry.items():
            if key in ("name", "profile"):
                continue
            if key in AGENT_ADAPTER_KEYS:
                agent[key] = self.check_setting(f"adapter.{key}", value, f"{where}.{key}")
            elif key in AGENT_SECTIONS:
                agent[key] = self.check_section(key, value, f"{where}.{key}")
            else:
                allowed = ", ".join(("name", "profile", *AGENT_ADAPTER_KEYS, *AGENT_SECTIONS))
                raise Mismatch(f"one of the keys {allowed}", key, where)

        if agent["profile"] == "custom" and not agent.get("command"):
            raise Mismatch("a command for the custom profile", None, f"{where}.command")
        return agent

    def check_section(self, section: str, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise Mismatch(f"a mapping of {section} settings", value, where)
        checked = {}
        for key, item in value.items():
            checked[key] = self.check_setting(f"{section}.{key}", item, f"{where}.{key}")
        return checked

    @staticmethod
    def check_setting(dotted: str, value: Any, where: str) -> Any:
        spec = SETTINGS.get(dotted)
        if spec is None:
            raise Mismatch("a known setting", dotted.rpartition(".")[2], where)
        return TaskList.check_part(spec.check, value, where)


def check_clean_text(text: str, expected: str, where: str = "") -> None:
    # A NUL byte cannot reach a path or an argv word, and a lone surrogate
    # (undecodable bytes in the environment) cannot be printed or logged.
    if "\x00" in text:
        raise Mismatch(f"{expected} without NUL characters", text, where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Mismatch(f"{expected} in valid UTF-8", text, where) from None


def parse_flag(text: str) -> bool:
    """Read an environment boolean: 1/0, true/false, yes/no, on/off.

    Raises ValueError for anything else.
    """
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def default_task_name(workdir: Any) -> Any:
    if not isinstance(workdir, str):
        return workdir
    name = os.path.basename(os.path.normpath(workdir))
    return name if name not in ("", ".", "..") else workdir


# ---------------------------------------------------------------------------
# The schema. Each field of a section dataclass is one setting; its metadata
# holds the check, the environment variable and the doc.


@dataclass(frozen=True)
class Setting:
    """One setting of the schema; `key` is its dotted name."""

    key: str
    default: Any
    check: Check
    env: str | None
    doc: str
    secret: bool = False


def setting(
    default: Any,
    check: Check,
    *,
    doc: str,
    env: str | None = None,
    secret: bool = False,
) -> Any:
    """Declare a setting as a dataclass field (the key is filled in later)."""
    stored = check(default)
    spec = Setting("", stored, check, env, doc, secret)
    if isinstance(stored, Mapping):
        return field(default_factory=lambda: stored, metadata={"setting": spec})
    return field(default=stored, metadata={"setting": spec})


@dataclass(frozen=True)
class AdapterConfig:
    """The agent CLI: which one, how it is started, deadlines and retries."""

    name: str = setting(
        "q",
        Choice(AGENT_NAMES),
        env="QCHAT_AGENT",
        doc="the agent: q, kiro, claude, gemini, codex, custom, or sim; qchat is q",
    )
    command: tuple[str, ...] | None = setting(
        None,
        Nullable(Command()),
        env="QCHAT_COMMAND",
        doc="a list of words or a shell-quoted line; null: the agent's own",
    )
    model: str | None = setting(
        None,
        Nullable(Text()),
        env="QCHAT_MODEL",
        doc="the model to ask for; null: the agent's default",
    )
    timeout: float = setting(
        120,
        Seconds(positive=True),
        env="QCHAT_TIMEOUT",
        doc="seconds one request may take, all attempts together",
    )
    max_retries: int = setting(
        3,
        Integer(minimum=0),
        env="QCHAT_MAX_RETRIES",
        doc="retries after the first attempt",
    )
    retry_delay: float = setting(
        1,
        Seconds(positive=False),
        env="QCHAT_RETRY_DELAY",
        doc="seconds before the first retry; it doubles, with jitter",
    )
    max_retry_delay: float = setting(
        60,
        Seconds(positive=False),
        doc="the longest wait between retries, in seconds",
    )
    kill_grace: float = setting(
        3,
        Seconds(positive=False),
        doc="seconds from SIGTERM to SIGKILL when a call is stopped",
    )
    attempt_timeout: float | None = setting(
        None,
        Nullable(Seconds(positive=True)),
        env="QCHAT_ATTEMPT_TIMEOUT",
        doc="seconds for one attempt, leaving time to retry a hang; null: all",
    )
    failure_patterns: Mapping[str, tuple[str, ...]] = setting(
        {},
        PatternsByKind(),
        doc="regexes per kind: throttled, auth, service; added to the agent's own",
    )


@dataclass(frozen=True)
class PerformanceConfig:
    """Pipes and concurrency."""

    buffer_size: int = setting(
        4096,
        Integer(),
        env="QCHAT_BUFFER_SIZE",
        doc="bytes read from the agent's pipes at a time (more when more is waiting)",
    )
    poll_interval: float = setting(
        0.1,
        Seconds(positive=True),
        env="QCHAT_POLL_INTERVAL",
        doc="seconds between periodic checks of a running call",
    )
    max_concurrent: int = setting(
        5,
        Integer(),
        env="QCHAT_MAX_CONCURRENT",
        doc="worker processes, so calls running at once",
    )


@dataclass(frozen=True)
class ResourcesConfig:
    """Limits on one call."""

    max_memory_mb: int | None = setting(
        None,
        Nullable(Integer()),
        env="QCHAT_MAX_MEMORY_MB",
        doc="MiB resident an agent's process tree may use; null: no limit",
    )
    max_output_size: int = setting(
        10485760,
        Integer(),
        env="QCHAT_MAX_OUTPUT_SIZE",
        doc="bytes of stdout and stderr one call may produce",
    )
    max_prompt_length: int = setting(
        1048576,
        Integer(),
        doc="the longest prompt, in UTF-8 bytes",
    )


@dataclass(frozen=True)
class LoggingConfig:
    """Where logs go and how they read."""

    level: str = setting(
        "INFO",
        Choice(LOG_LEVELS, upper=True),
        env="QCHAT_LOG_LEVEL",
        doc="DEBUG, INFO, WARNING, ERROR or CRITICAL",
    )
    format: str = setting(
        "json",
        LogFormat(),
        doc="json, text, or a logging format string",
    )
    file: str | None = setting(
        None,
        Nullable(Text("a path")),
        env="QCHAT_LOG_FILE",
        doc="a log file, rotated by size; null: stderr only",
    )
    max_bytes: int = setting(
        10485760,
        Integer(),
        doc="rotate the log file at this many bytes",
    )
    backup_count: int = setting(
        5,
        Integer(minimum=0),
        doc="rotated log files to keep",
    )
    verbose: bool = setting(
        False,
        Flag(),
        env="QCHAT_VERBOSE",
        doc="log more detail about each call",
    )
    debug: bool = setting(
        False,
        Flag(),
        env="QCHAT_DEBUG",
        doc="debug mode: the most detail, and tracebacks from the CLI",
    )


@dataclass(frozen=True)
class MonitoringConfig:
    """The health and metrics server, and the metrics summary."""

    metrics_enabled: bool = setting(
        True,
        Flag(),
        doc="serve Prometheus metrics at /metrics",
    )
    metrics_interval: int = setting(
        60,
        Integer(),
        doc="log a metrics summary every this many loop iterations",
    )
    health_check_enabled: bool = setting(
        True,
        Flag(),
        env="HEALTH_CHECK_ENABLED",
        doc="serve /health and /health/detailed",
    )
    health_check_interval: float = setting(
        30,
        Seconds(positive=True),
        env="HEALTH_CHECK_INTERVAL",
        doc="seconds between health self-checks",
    )
    health_check_host: str = setting(
        "127.0.0.1",
        Text("a host name or address"),
        env="QCHAT_HEALTH_HOST",
        doc="the address the server listens on",
    )
    health_check_port: int = setting(
        8080,
        Integer(minimum=0, maximum=65535),
        env="QCHAT_HEALTH_PORT",
        doc="the port it listens on; 0 picks a free one",
    )
    console_token: str | None = setting(
        None,
        Nullable(Text()),
        env="QCHAT_CONSOLE_TOKEN",
        secret=True,
        doc="the console's action token; null: random, in STATE_DIR/console.token",
    )


@dataclass(frozen=True)
class SecurityConfig:
    """What prompts may not contain."""

    blocked_patterns: tuple[str, ...] = setting(
        [],
        Patterns(),
        doc="regexes; a prompt matching any of them is rejected",
    )


@dataclass(frozen=True)
class SupervisorConfig:
    """The worker pool, its queue, restarts and shutdown."""

    queue_size: int = setting(
        1000,
        Integer(),
        doc="calls that may wait for a worker; one more raises QueueFull",
    )
    max_restarts: int = setting(
        10,
        Integer(),
        doc="worker restarts allowed within restart_period",
    )
    restart_period: float = setting(
        60,
        Seconds(positive=True),
        doc="the window, in seconds, that max_restarts counts in",
    )
    restart_backoff: float = setting(
        0.1,
        Seconds(positive=False),
        doc="seconds before a dead worker's first restart; it doubles",
    )
    restart_backoff_max: float = setting(
        10,
        Seconds(positive=False),
        doc="the longest wait before a restart, in seconds",
    )
    max_requests_per_worker: int | None = setting(
        1000,
        Nullable(Integer()),
        doc="replace a worker after this many calls; null: never",
    )
    max_worker_memory_mb: int | None = setting(
        None,
        Nullable(Integer()),
        doc="replace a worker past this many MiB resident; null: never",
    )
    drain_timeout: float = setting(
        30,
        Seconds(positive=False),
        doc="seconds running calls get to finish at shutdown",
    )
    hang_grace: float = setting(
        10,
        Seconds(positive=False),
        doc="seconds past a call's deadline before its worker counts as hung",
    )


@dataclass(frozen=True)
class BreakerConfig:
    """The circuit breaker in front of the agent."""

    enabled: bool = setting(
        True,
        Flag(),
        doc="stop calling a service that keeps failing",
    )
    fail_max: int = setting(
        5,
        Integer(),
        doc="failures in a row that open the circuit",
    )
    reset_timeout: float = setting(
        60,
        Seconds(positive=True),
        doc="seconds the circuit stays open before a trial call",
    )
    success_threshold: int = setting(
        1,
        Integer(),
        doc="successful trial calls that close it again",
    )
    storage: str = setting(
        "disk",
        Choice(("memory", "disk")),
        doc="memory, this process only; disk, shared through the state directory",
    )


@dataclass(frozen=True)
class LimitsConfig:
    """The request rate, shared by every worker."""

    requests_per_minute: float | None = setting(
        None,
        Nullable(Number(positive=True)),
        doc="calls per minute; null: no limit",
    )
    burst: int | None = setting(
        None,
        Nullable(Integer()),
        doc="calls allowed at once after a quiet spell; null: one minute's worth",
    )


@dataclass(frozen=True)
class CacheConfig:
    """The response cache."""

    enabled: bool = setting(
        True,
        Flag(),
        env="QCHAT_CACHE_ENABLED",
        doc="answer a repeated question from the cache",
    )
    dir: str | None = setting(
        None,
        Nullable(Text("a path")),
        doc="where responses are kept; null: STATE_DIR/cache",
    )
    ttl: float = setting(
        86400,
        Seconds(positive=True),
        doc="seconds a cached response stays valid",
    )
    size_limit: int = setting(
        1073741824,
        Integer(),
        doc="bytes the cache may hold",
    )
    eviction_policy: str = setting(
        "least-recently-stored",
        Choice(EVICTION_POLICIES),
        doc="which entries go first when it is full",
    )
    loop_iterations: bool = setting(
        False,
        Flag(),
        doc="cache loop iterations too; a cached iteration does no work",
    )


@dataclass(frozen=True)
class StateConfig:
    """Where breaker, rate-limit and checkpoint state lives."""

    dir: str | None = setting(
        None,
        Nullable(Text("a path")),
        env="QCHAT_STATE_DIR",
        doc="null: WORKDIR/.ralph, or ~/.local/state/ralph-supervisor",
    )
    backend: str = setting(
        "local",
        Choice(("local", "redis")),
        doc="local: breaker, rate limit and cache shared on this host; redis: by all hosts",
    )
    redis_url: str | None = setting(
        None,
        Nullable(RedisUrl()),
        doc="redis://host:port/db (rediss:// for TLS) when backend is redis",
    )
    redis_tls: bool = setting(
        False,
        Flag(),
        doc="connect to Redis over TLS, as a rediss:// URL does",
    )
    redis_tls_ca_file: str | None = setting(
        None,
        Nullable(Text("a path")),
        doc="the CA bundle that signed the Redis server's certificate; null: the system's",
    )
    redis_password_file: str | None = setting(
        None,
        Nullable(Text("a path")),
        doc="a file whose first line is the Redis password; or put it in redis_url",
    )
    redis_timeout: float = setting(
        0.3,
        Seconds(positive=True),
        doc="seconds Redis has to connect or answer; slower, this host uses local state",
    )
    redis_prefix: str = setting(
        "ralph",
        Text("a key prefix"),
        doc="the prefix of every Redis key: one per account whose quota is shared",
    )
    redis_retry_interval: float = setting(
        1,
        Seconds(positive=True),
        doc="seconds before reconnecting to Redis after it failed; doubles, up to 30",
    )


@dataclass(frozen=True)
class LoopConfig:
    """The Ralph loop."""

    prompt_file: str = setting(
        "PROMPT.md",
        Text("a path"),
        doc="the task prompt, relative to the workdir",
    )
    completion_promise: str = setting(
        "LOOP_COMPLETE",
        Text(),
        doc="text in an answer that says the task is done",
    )
    max_iterations: int = setting(
        100,
        Integer(),
        doc="iterations before the loop stops",
    )
    max_runtime: float = setting(
        14400,
        Seconds(positive=True),
        doc="seconds before the loop stops",
    )
    checkpoint_interval: int = setting(
        5,
        Integer(),
        doc="checkpoint every this many iterations",
    )
    max_consecutive_failures: int | None = setting(
        5,
        Nullable(RuleLimit()),
        doc="failed iterations in a row before the loop stops; 0 or null: never",
    )
    max_open_wait: float = setting(
        900,
        Seconds(positive=True),
        doc="seconds to wait for an open circuit before the loop stops",
    )
    git_commit: bool = setting(
        True,
        Flag(),
        doc="commit the workdir at each checkpoint",
    )
    max_idle_iterations: int | None = setting(
        5,
        Nullable(RuleLimit()),
        doc="answers in a row that leave the git work tree unchanged: stop, stalled; "
        "0 or null: never",
    )
    max_repeats: int | None = setting(
        3,
        Nullable(RuleLimit(2)),
        doc="answers in a row alike: stop, repeating; 0 or null: never",
    )
    repeat_similarity: float = setting(
        0.95,
        Ratio(),
        doc="how alike two answers must be to count as the same (word by word, 1: equal)",
    )


@dataclass(frozen=True)
class TaskConfig:
    """One loop to run: its name, its workdir and its prompt file."""

    name: str
    workdir: str
    prompt_file: str


def _all_defaults() -> Mapping[str, str]:
    return MappingProxyType(dict.fromkeys(SETTINGS, SOURCE_DEFAULT))


@dataclass(frozen=True)
class Config:
    """The whole configuration; read it as config.adapter.timeout."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    state: StateConfig = field(default_factory=StateConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    tasks: tuple[TaskConfig, ...] = setting(
        [],
        TaskList(),
        doc="loops to run: workdir, name (default: its basename), prompt_file",
    )
    agents: Mapping[str, Any] = setting(
        [],
        AgentList(),
        doc="agents to fail over between, in order (or {strategy, list}); empty: adapter",
    )

    # Where the values came from; not part of the configuration's value.
    path: Path | None = field(default=None, compare=False)
    sources: Mapping[str, str] = field(default_factory=_all_defaults, compare=False)

    @property
    def agent_name(self) -> str:
        """The canonical agent profile name ("qchat" is q)."""
        return AGENT_ALIASES.get(self.adapter.name, self.adapter.name)

    @property
    def agent_strategy(self) -> str:
        """failover (in order) or round_robin (among healthy agents)."""
        return str(self.agents["strategy"])

    def agent_configs(self) -> list[tuple[str, Config]]:
        """(name, configuration) for each agent, in order.

        Without an `agents:` list there is one agent, the adapter section's.
        Each entry's values override the adapter, breaker and limits keys.
        """
        entries = self.agents["list"]
        if not entries:
            return [(self.agent_name, self)]

        configs = []
        for entry in entries:
            overrides: dict[str, Any] = {"adapter.name": entry["profile"]}
            for key, value in entry.items():
                if key in AGENT_ADAPTER_KEYS:
                    overrides[f"adapter.{key}"] = value
                elif key in AGENT_SECTIONS:
                    for name, item in value.items():
                        overrides[f"{key}.{name}"] = item
            configs.append((entry["name"], self.with_overrides(overrides)))
        return configs

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. config.get("adapter.timeout")."""
        if key not in SETTINGS:
            raise KeyError(key)
        section, _, name = key.partition(".")
        value = getattr(self, section)
        return getattr(value, name) if name else value

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A new Config with these dotted keys changed and checked again.

        The other values keep their sources. Tasks keep the prompt_file they
        were loaded with, even when loop.prompt_file changes here.
        """
        with _only_config_errors(SOURCE_OVERRIDE):
            base = {
                key: _Value(self.get(key), self.sources.get(key, SOURCE_DEFAULT), (0, 0))
                for key in SETTINGS
            }
            layer, problems = _read_overrides(overrides)
            return _build([base, layer], self.path, problems)

    def state_dir_for(self, workdir: str | os.PathLike[str] | None = None) -> Path:
        """The state directory (not created): state.dir, WORKDIR/.ralph, or
        ~/.local/state/ralph-supervisor. A relative state.dir is taken from
        the workdir, or the current directory without one."""
        if self.state.dir is not None:
            path = Path(self.state.dir).expanduser()
            base = Path(workdir) if workdir is not None else Path.cwd()
            return Path(os.path.abspath(base / path))
        if workdir is not None:
            return Path(os.path.abspath(Path(workdir) / ".ralph"))
        return DEFAULT_STATE_DIR.expanduser()


def _collect_sections() -> dict[str, type[Any]]:
    sections: dict[str, type[Any]] = {}
    for item in dataclasses.fields(Config):
        factory = item.default_factory
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            sections[item.name] = factory
    return sections


def _collect_settings() -> dict[str, Setting]:
    settings: dict[str, Setting] = {}
    for item in dataclasses.fields(Config):
        if "setting" in item.metadata:
            settings[item.name] = dataclasses.replace(item.metadata["setting"], key=item.name)
        elif item.name in SECTIONS:
            for part in dataclasses.fields(SECTIONS[item.name]):
                key = f"{item.name}.{part.name}"
                settings[key] = dataclasses.replace(part.metadata["setting"], key=key)
    return settings


# Section name -> dataclass, and dotted key -> Setting, in schema order.
SECTIONS: Mapping[str, type[Any]] = MappingProxyType(_collect_sections())
SETTINGS: Mapping[str, Setting] = MappingProxyType(_collect_settings())


class SchemaRow(NamedTuple):
    key: str
    default: Any
    env: str | None
    doc: str


def schema_rows() -> Iterator[SchemaRow]:
    """(dotted key, default as plain YAML data, env var, doc) for every setting."""
    for key, item in SETTINGS.items():
        yield SchemaRow(key, _plain(item.default), item.env, item.doc)


# ---------------------------------------------------------------------------
# Loading.


class _Value(NamedTuple):
    """A raw value from one layer, where it came from, and how to sort it.

    `text` is an environment variable's text, which messages show rather than
    the number read from it.
    """

    value: Any
    source: str
    order: tuple[int, int]
    text: str | None = None


class _Problem(NamedTuple):
    order: tuple[int, int]
    text: str


# Problems are listed file first (by line), then environment, then overrides.
_ENV_ORDER = (1, 0)
_OVERRIDE_ORDER = (2, 0)
_LATE_ORDER = (3, 0)


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load the configuration: defaults < YAML file < environment < overrides.

    env defaults to os.environ; overrides maps dotted keys to values. Raises
    ConfigError, and nothing else, for any problem with any of them.
    """
    where = os.fspath(path) if isinstance(path, str | os.PathLike) else "configuration"
    with _only_config_errors(str(where)):
        return _load(path, env, overrides)


@contextmanager
def _only_config_errors(where: str) -> Iterator[None]:
    try:
        yield
    except ConfigError:
        raise
    except Exception as error:
        # A check that fails in a way nobody foresaw is a bug here, but the
        # caller was promised ConfigError: keep the cause for the traceback.
        raise ConfigError(f"{where}: internal error while loading: {error!r}") from error


def _load(path: Any, env: Any, overrides: Any) -> Config:
    layers: list[dict[str, _Value]] = []
    problems: list[_Problem] = []

    if path is not None:
        if not isinstance(path, str | os.PathLike):
            raise ConfigError(f"configuration path: expected a path, got {_show(path)}")
        layer, found = _read_file(path)
        layers.append(layer)
        problems += found

    layer, found = _read_env(os.environ if env is None else env)
    layers.append(layer)
    problems += found

    layer, found = _read_overrides({} if overrides is None else overrides)
    layers.append(layer)
    problems += found

    return _build(layers, None if path is None else Path(path), problems)


def _build(
    layers: list[dict[str, _Value]],
    path: Path | None,
    problems: list[_Problem],
) -> Config:
    values = {key: item.default for key, item in SETTINGS.items()}
    sources = dict.fromkeys(SETTINGS, SOURCE_DEFAULT)

    # Check every layer's values, so that a bad value in the file shows up
    # even when the environment wins; the last layer with a key wins.
    for layer in layers:
        for key, raw in layer.items():
            try:
                value = SETTINGS[key].check(raw.value)
            except Mismatch as mismatch:
                problems.append(_mismatch_problem(key, raw, mismatch))
                continue
            values[key] = value
            sources[key] = raw.source

    problems += _check_together(values, sources)
    _raise_problems(problems)

    tasks = tuple(
        TaskConfig(
            name=task["name"],
            workdir=task["workdir"],
            prompt_file=task["prompt_file"] or values["loop.prompt_file"],
        )
        for task in values["tasks"]
    )
    sections = {
        name: cls(**{part.name: values[f"{name}.{part.name}"] for part in dataclasses.fields(cls)})
        for name, cls in SECTIONS.items()
    }
    return Config(
        **sections,
        tasks=tasks,
        agents=values["agents"],
        path=path,
        sources=MappingProxyType(sources),
    )


def _check_together(values: dict[str, Any], sources: dict[str, str]) -> list[_Problem]:
    """Rules that span settings."""
    problems: list[_Problem] = []

    if values["state.backend"] == "redis" and values["state.redis_url"] is None:
        source = sources["state.backend"]
        text = (
            f"{source}: state.redis_url: expected a redis URL when state.backend "
            f"is 'redis', got None"
        )
        problems.append(_Problem(_order_of(source), text))

    return problems


def _raise_problems(problems: list[_Problem]) -> None:
    if not problems:
        return
    texts = [problem.text for problem in sorted(problems, key=lambda p: p.order)]
    message = texts[0]
    if len(texts) > 1:
        message += f" (and {len(texts) - 1} more)"
    raise ConfigError(message, problems=texts)


def _mismatch_problem(key: str, raw: _Value, mismatch: Mismatch) -> _Problem:
    got = mismatch.value
    if raw.text is not None and not mismatch.where:
        got = raw.text
    text = f"{raw.source}: {key}{mismatch.where}: expected {mismatch.expected}, got {_show(got)}"
    return _Problem(raw.order, text)


def _order_of(source: str) -> tuple[int, int]:
    if source.startswith("env "):
        return _ENV_ORDER
    if source == SOURCE_OVERRIDE:
        return _OVERRIDE_ORDER
    head, _, line = source.rpartition(":")
    if head and line.isdigit():
        return (0, int(line))
    return _LATE_ORDER


def _read_env(env: Any) -> tuple[dict[str, _Value], list[_Problem]]:
    layer: dict[str, _Value] = {}
    problems: list[_Problem] = []
    if not isinstance(env, Mapping):
        raise ConfigError(f"environment: expected a mapping, got {_show(env)}")

    for index, (key, item) in enumerate(SETTINGS.items()):
        if item.env is None:
            continue
        text = env.get(item.env)
        source = f"env {item.env}"

        # Unset and empty are the same: `QCHAT_TIMEOUT= cmd` in a shell, or
        # an empty ENV line in a container, means "no value".
        if text is None:
            continue
        if not isinstance(text, str):
            problems.append(_Problem(_ENV_ORDER, f"{source}: expected text, got {_show(text)}"))
            continue
        # Stray spaces around a value (`KEY=300 ` in a compose file) are
        # never meant.
        text = text.strip()
        if not text:
            continue

        raw = _Value(text, source, (_ENV_ORDER[0], index), text)
        try:
            layer[key] = raw._replace(value=item.check.from_text(text))
        except Mismatch as mismatch:
            problems.append(_mismatch_problem(key, raw, mismatch))

    return layer, problems


def _read_overrides(overrides: Any) -> tuple[dict[str, _Value], list[_Problem]]:
    layer: dict[str, _Value] = {}
    problems: list[_Problem] = []
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{SOURCE_OVERRIDE}: expected a mapping, got {_show(overrides)}")

    for key, value in overrides.items():
        if isinstance(key, str) and key in SETTINGS:
            layer[key] = _Value(value, SOURCE_OVERRIDE, _OVERRIDE_ORDER)
        elif isinstance(key, str) and key in SECTIONS:
            text = f"{SOURCE_OVERRIDE}: {key}: expected a dotted key such as '{key}.<name>'"
            problems.append(_Problem(_OVERRIDE_ORDER, text))
        else:
            text = f"{SOURCE_OVERRIDE}: {_unknown_key(key)}"
            problems.append(_Problem(_OVERRIDE_ORDER, text))

    return layer, problems


def _unknown_key(key: Any) -> str:
    name = key if isinstance(key, str) else _show(key)
    choices = list(SECTIONS) + list(SETTINGS)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)

    # A leaf in the wrong section, or at the top level: match on its own name.
    if not close:
        leaf = name.rpartition(".")[2]
        by_leaf = {dotted.rpartition(".")[2]: dotted for dotted in SETTINGS}
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
        close = [by_leaf[near[0]]] if near else []

    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key {_show(name)}{hint}"


# ---------------------------------------------------------------------------
# The YAML file. It is read node by node so that every key has its line.


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases.

    A few lines of nested aliases expand to billions of nodes ("billion
    laughs") in anything that walks the result. A configuration never needs
    them, so the first one stops the parse.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in this file", mark
            )
        return super().compose_node(parent, index)


_NULL_TAG = "tag:yaml.org,2002:null"


def _read_file(path: str | os.PathLike[str]) -> tuple[dict[str, _Value], list[_Problem]]:
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    text = _read_text(path, name)
    loader, root = _compose(text, name)
    try:
        return _read_root(loader, root, name)
    finally:
        loader.dispose()


def _read_text(path: str | os.PathLike[str], name: str) -> str:
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(f"{name}: cannot read the file: {reason}") from None

    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_FILE_BYTES} bytes; is it the right file?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(f"{name}:{line}: not UTF-8 text") from None


def _compose(text: str, name: str) -> tuple[yaml.SafeLoader, yaml.Node | None]:
    try:
        # The reader checks for control characters as it is made.
        loader = _NoAliasLoader(text)
        return loader, loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        column = f" (column {mark.column + 1})" if mark is not None else ""
        problem = error.problem or error.context or "syntax error"
        raise ConfigError(f"{where}: invalid YAML: {problem}{column}") from None
    except yaml.reader.ReaderError as error:
        line = text[: error.position].count("\n") + 1
        raise ConfigError(f"{name}:{line}: invalid YAML: {error.reason}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{name}: invalid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{name}: invalid YAML: nested too deeply") from None


def _read_root(
    loader: yaml.SafeLoader, root: yaml.Node | None, name: str
) -> tuple[dict[str, _Value], list[_Problem]]:
    layer: dict[str, _Value] = {}
    problems: list[_Problem] = []

    # An empty file, or one of comments only, means the defaults.
    if root is None or _is_null(root):
        return layer, problems
    if not isinstance(root, yaml.MappingNode):
        where = f"{name}:{root.start_mark.line + 1}"
        expected = "a mapping of sections at the top level"
        raise ConfigError(f"{where}: expected {expected}, got {_show_node(root)}")

    for key, value_node, where, order in _entries(root, name, "", problems):
        if key in SECTIONS:
            _read_section(loader, key, value_node, where, name, layer, problems)
        elif key in SETTINGS:
            _read_value(loader, key, value_node, where, order, layer, problems)
        else:
            problems.append(_Problem(order, f"{where}: {_unknown_key(key)}"))

    return layer, problems


def _read_section(
    loader: yaml.SafeLoader,
    section: str,
    node: yaml.Node,
    where: str,
    name: str,
    layer: dict[str, _Value],
    problems: list[_Problem],
) -> None:
    # `adapter:` with every key commented out is an empty section.
    if _is_null(node):
        return
    if not isinstance(node, yaml.MappingNode):
        text = f"{where}: {section}: expected a mapping of settings, got {_show_node(node)}"
        problems.append(_Problem(_order_of(where), text))
        return

    for part, value_node, part_where, order in _entries(node, name, f"{section}.", problems):
        key = f"{section}.{part}"
        if key in SETTINGS:
            _read_value(loader, key, value_node, part_where, order, layer, problems)
        else:
            problems.append(_Problem(order, f"{part_where}: {_unknown_key(key)}"))


def _entries(
    node: yaml.MappingNode, name: str, prefix: str, problems: list[_Problem]
) -> Iterator[tuple[str, yaml.Node, str, tuple[int, int]]]:
    """(key, value node, "FILE:LINE", order) for each entry of a mapping."""
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        where = f"{name}:{line}"
        order = (0, line)

        if not isinstance(key_node, yaml.ScalarNode):
            expected = f"expected a key name, got {_show_node(key_node)}"
            section = prefix.rstrip(".") or "(top level)"
            problems.append(_Problem(order, f"{where}: {section}: {expected}"))
            continue

        key = str(key_node.value)
        if key in first_line:
            text = f"{where}: duplicate key '{prefix}{key}' (first on line {first_line[key]})"
            problems.append(_Problem(order, text))
            continue
        first_line[key] = line

        yield key, value_node, where, order


def _read_value(
    loader: yaml.SafeLoader,
    key: str,
    node: yaml.Node,
    where: str,
    order: tuple[int, int],
    layer: dict[str, _Value],
    problems: list[_Problem],
) -> None:
    try:
        value = loader.construct_object(node, deep=True)
    except yaml.YAMLError as error:
        reason = getattr(error, "problem", None) or str(error)
        problems.append(_Problem(order, f"{where}: {key}: cannot read the value: {reason}"))
        return
    except (ValueError, OverflowError, RecursionError) as error:
        # An integer of 5000 digits, a date like 2024-13-45. Python's
        # message for the first goes on to suggest a fix that is not ours.
        reason = str(error).split(";")[0]
        problems.append(_Problem(order, f"{where}: {key}: cannot read the value: {reason}"))
        return

    layer[key] = _Value(value, where, order)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _show_node(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _show(node.value)


def _show(value: Any) -> str:
    """A short repr for messages; never fails."""
    try:
        text = repr(value)
    except Exception:
        # repr of an int past 4300 digits raises; so does deep nesting.
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------
# Presenting: config show, and the documented example file.


def describe(config: Config) -> str:
    """The effective configuration as YAML, each key noting its source."""
    where = str(config.path) if config.path is not None else "none"
    lines = [f"# Effective configuration (file: {where}); secrets are hidden."]
    entries: list[tuple[str, str]] = []

    for section, cls in SECTIONS.items():
        entries.append((f"{section}:", ""))
        for part in dataclasses.fields(cls):
            key = f"{section}.{part.name}"
            entries.append((f"  {part.name}: {_render_setting(config, key)}", key))
    for key in SETTINGS:
        if key not in SECTIONS and "." not in key:
            entries.append((f"{key}: {_render_setting(config, key)}", key))

    # Line the source notes up in one column, unless a value is very long.
    width = max((len(text) for text, key in entries if key and len(text) <= 60), default=0)
    for text, key in entries:
        if not key:
            lines.append(text)
            continue
        note = f"# from {config.sources.get(key, SOURCE_DEFAULT)}"
        if SETTINGS[key].secret and config.get(key) is not None:
            note += " (hidden)"
        lines.append(f"{text.ljust(width)}  {note}")

    return "\n".join(lines) + "\n"


def _render_setting(config: Config, key: str) -> str:
    value = config.get(key)
    if SETTINGS[key].secret and value is not None:
        return "'***'"
    if key == "state.redis_url" and value is not None:
        value = _hide_password(value)
    return render_value(value)


def _hide_password(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "***"


def render_value(value: Any) -> str:
    """One value as a single line of YAML."""
    plain = _plain(value)
    if isinstance(plain, str) and ("\n" in plain or not plain.isprintable()):
        # A double-quoted YAML scalar with escapes keeps it on one line.
        text = yaml.safe_dump(plain, default_style='"', width=math.inf, allow_unicode=True)
    else:
        text = yaml.safe_dump(
            plain,
            default_flow_style=True,
            width=math.inf,
            allow_unicode=True,
            sort_keys=False,
        )
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def _plain(value: Any) -> Any:
    """Tuples, mapping proxies and task records as plain YAML data."""
    if isinstance(value, TaskConfig):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


_EXAMPLE_HEADER = """\
# ralph-supervisor configuration: every setting, set to its default.
#
# Precedence: built-in defaults < this file < environment < command-line.
# Durations are seconds, sizes bytes unless the key says _mb; null means
# "no limit" or "not set". `ralph-supervisor config show --config FILE`
# prints the values in effect and where each came from.
#
# Written by `ralph-supervisor config example`, from the schema in
# ralph_supervisor/config.py; a test checks that the two agree."""


def render_example() -> str:
    """The documented example file: every setting at its default, with its doc."""
    lines = [_EXAMPLE_HEADER]

    for section, cls in SECTIONS.items():
        lines += ["", f"# {_first_line(cls.__doc__)}", f"{section}:"]
        for part in dataclasses.fields(cls):
            item = SETTINGS[f"{section}.{part.name}"]
            lines.append(f"  # {_example_note(item)}")
            lines.append(f"  {part.name}: {render_value(item.default)}")

    for key, item in SETTINGS.items():
        if "." not in key:
            lines += ["", f"# {_example_note(item)}", f"{key}: {render_value(item.default)}"]

    return "\n".join(lines) + "\n"


def _example_note(item: Setting) -> str:
    return f"{item.doc} (env {item.env})" if item.env else item.doc


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else ""


# ---------------------------------------------------------------------------
# The state directory.


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create a directory and its missing parents, each with mode 0700.

    A directory that already exists is left as it is: it may be shared on
    purpose, and changing its mode is not ours to do.
    """
    target = Path(path).expanduser()
    missing: list[Path] = []
    for part in [target, *target.parents]:
        if part.is_dir():
            break
        missing.append(part)

    for part in reversed(missing):
        try:
            part.mkdir(mode=0o700)
        except FileExistsError:
            # Another process made it between our look and our mkdir.
            if not part.is_dir():
                raise
            continue
        # mkdir's mode passes through the umask; say exactly what we mean.
        os.chmod(part, 0o700)

    return target
