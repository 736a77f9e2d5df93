"""The configuration layer: real YAML files in a temporary directory, real checks."""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ralph_supervisor.config import (
    AGENT_NAMES,
    FAILURE_KINDS,
    MAX_FILE_BYTES,
    SECTIONS,
    SETTINGS,
    AgentList,
    Check,
    Choice,
    Command,
    Config,
    Flag,
    Integer,
    LogFormat,
    Nullable,
    Number,
    Patterns,
    PatternsByKind,
    TaskConfig,
    TaskList,
    Text,
    describe,
    ensure_private_dir,
    load_config,
    render_example,
    schema_rows,
)
from ralph_supervisor.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "qchat.yaml"
DESIGN = ROOT / "docs" / "design.md"

# The deployment guide's file, byte for byte: its blank lines hold two
# spaces, written as \x20 so that editors and linters leave them be.
GUIDE_FILE = """\
# config/qchat.yaml
adapter:
  name: qchat
  timeout: 300
  max_retries: 5
  retry_delay: 2
\x20\x20
performance:
  buffer_size: 8192
  poll_interval: 0.1
  max_concurrent: 10
\x20\x20
logging:
  level: INFO
  format: "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
  file: /var/log/ralph/qchat.log
\x20\x20
monitoring:
  metrics_enabled: true
  metrics_interval: 60
  health_check_port: 8080
"""

ENV_NAMES = sorted({item.env for item in SETTINGS.values() if item.env})


def write(tmp_path: Path, text: str, name: str = "qchat.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | None = None, **kwargs: Any) -> list[str]:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as caught:
        load_config(path, **kwargs)
    return caught.value.problems


def only_problem(path: Path | None = None, **kwargs: Any) -> str:
    problems = problems_of(path, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------------------
# Defaults and the schema.


def test_defaults_match_the_design_table() -> None:
    config = load_config(env={})

    assert config == Config()
    assert config.path is None
    assert set(config.sources) == set(SETTINGS)
    assert set(config.sources.values()) == {"default"}

    assert config.adapter.name == "q"
    assert config.adapter.command is None
    assert config.adapter.timeout == 120.0
    assert isinstance(config.adapter.timeout, float)
    assert config.adapter.max_retries == 3
    assert config.performance.buffer_size == 4096
    assert config.resources.max_memory_mb is None
    assert config.logging.level == "INFO"
    assert config.logging.format == "json"
    assert config.monitoring.health_check_host == "127.0.0.1"
    assert config.supervisor.max_requests_per_worker == 1000
    assert config.breaker.storage == "disk"
    assert config.cache.eviction_policy == "least-recently-stored"
    assert config.state.backend == "local"
    assert config.loop.prompt_file == "PROMPT.md"
    assert config.tasks == ()
    assert config.agents == {"strategy": "failover", "list": ()}
    assert dict(config.adapter.failure_patterns) == {}


def _design_table() -> dict[str, tuple[str, str]]:
    rows: dict[str, tuple[str, str]] = {}
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        is_key = re.fullmatch(r"[a-z_]+(\.[a-z_]+)?", cells[0]) and cells[0] != "key"
        if len(cells) == 4 and is_key:
            rows[cells[0]] = (cells[2], cells[3])
    return rows


def test_schema_agrees_with_the_design_table() -> None:
    table = _design_table()
    schema = {row.key: row for row in schema_rows()}
    assert len(table) > 50

    for key, (default_text, env) in table.items():
        assert key in schema, f"{key} is documented but not in the schema"
        assert (schema[key].env or "") == env, key

        # "null (the agent's own)": the value is the first word.
        expected = yaml.safe_load(default_text.split(" (")[0])
        assert schema[key].default == expected, key

    # agents is reserved for failover and not in the table yet.
    assert set(schema) - set(table) <= {"agents"}


def test_schema_rows_have_docs_and_plain_defaults() -> None:
    rows = list(schema_rows())

    assert [row.key for row in rows] == list(SETTINGS)
    for row in rows:
        assert row.doc and "\n" not in row.doc, row.key
        yaml.safe_dump(row.default)  # plain YAML data, no tuples or proxies


def test_agent_names_live_in_one_constant() -> None:
    assert AGENT_NAMES == ("q", "qchat", "kiro", "sim", "claude", "gemini", "codex", "custom")
    for name in AGENT_NAMES:
        config = load_config(env={}, overrides={"adapter.name": name})
        assert config.adapter.name == name
        assert config.agent_name == ("q" if name == "qchat" else name)


# ---------------------------------------------------------------------------
# Layers and sources.


def test_precedence_file_then_env_then_override(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter:\n  name: kiro\n  timeout: 300\n")

    from_file = load_config(path, env={})
    assert from_file.adapter.timeout == 300.0
    assert from_file.sources["adapter.timeout"] == f"{path}:3"
    assert from_file.sources["adapter.name"] == f"{path}:2"
    assert from_file.sources["adapter.max_retries"] == "default"
    assert from_file.path == path

    from_env = load_config(path, env={"QCHAT_TIMEOUT": "30"})
    assert from_env.adapter.timeout == 30.0
    assert from_env.sources["adapter.timeout"] == "env QCHAT_TIMEOUT"
    assert from_env.adapter.name == "kiro"

    overridden = load_config(path, env={"QCHAT_TIMEOUT": "30"}, overrides={"adapter.timeout": 5})
    assert overridden.adapter.timeout == 5.0
    assert overridden.sources["adapter.timeout"] == "override"
    assert overridden.sources["adapter.name"] == f"{path}:2"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCHAT_MAX_RETRIES", "7")
    config = load_config()
    assert config.adapter.max_retries == 7
    assert config.sources["adapter.max_retries"] == "env QCHAT_MAX_RETRIES"


def test_with_overrides_checks_again_and_keeps_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "performance:\n  max_concurrent: 8\n")
    config = load_config(path, env={"QCHAT_TIMEOUT": "30"})

    changed = config.with_overrides({"adapter.max_retries": 0})
    assert changed.adapter.max_retries == 0
    assert changed.sources["adapter.max_retries"] == "override"
    assert changed.sources["adapter.timeout"] == "env QCHAT_TIMEOUT"
    assert changed.sources["performance.max_concurrent"] == f"{path}:2"
    assert changed.performance.max_concurrent == 8
    assert changed.path == path
    assert config.adapter.max_retries == 3  # the original is untouched

    with pytest.raises(ConfigError) as caught:
        config.with_overrides({"adapter.timeout": 0})
    assert str(caught.value) == (
        "override: adapter.timeout: expected a positive number of seconds, got 0"
    )

    with pytest.raises(ConfigError, match="did you mean 'adapter.timeout'"):
        config.with_overrides({"adapter.timout": 5})


def test_with_overrides_keeps_tasks() -> None:
    config = load_config(env={}, overrides={"tasks": [{"workdir": "/srv/a"}]})
    changed = config.with_overrides({"adapter.timeout": 9})
    assert changed.tasks == config.tasks


def test_config_is_frozen() -> None:
    config = load_config(env={})
    with pytest.raises(AttributeError):
        config.adapter.timeout = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.sources["adapter.timeout"] = "x"  # type: ignore[index]


def test_get_reads_dotted_keys() -> None:
    config = load_config(env={}, overrides={"cache.ttl": 10})
    assert config.get("cache.ttl") == 10.0
    assert config.get("tasks") == ()
    with pytest.raises(KeyError):
        config.get("cache.nope")


# ---------------------------------------------------------------------------
# The environment.

ENV_CASES = [
    ("QCHAT_AGENT", "kiro", "adapter.name", "kiro"),
    (
        "QCHAT_COMMAND",
        "q chat --trust-all-tools",
        "adapter.command",
        ("q", "chat", "--trust-all-tools"),
    ),
    ("QCHAT_MODEL", "claude-sonnet", "adapter.model", "claude-sonnet"),
    ("QCHAT_TIMEOUT", "300", "adapter.timeout", 300.0),
    ("QCHAT_MAX_RETRIES", "5", "adapter.max_retries", 5),
    ("QCHAT_RETRY_DELAY", "2", "adapter.retry_delay", 2.0),
    ("QCHAT_ATTEMPT_TIMEOUT", "30", "adapter.attempt_timeout", 30.0),
    ("QCHAT_BUFFER_SIZE", "8192", "performance.buffer_size", 8192),
    ("QCHAT_POLL_INTERVAL", "0.1", "performance.poll_interval", 0.1),
    ("QCHAT_MAX_CONCURRENT", "10", "performance.max_concurrent", 10),
    ("QCHAT_MAX_MEMORY_MB", "4096", "resources.max_memory_mb", 4096),
    ("QCHAT_MAX_OUTPUT_SIZE", "10485760", "resources.max_output_size", 10485760),
    ("QCHAT_LOG_LEVEL", "debug", "logging.level", "DEBUG"),
    ("QCHAT_LOG_FILE", "/var/log/ralph/qchat.log", "logging.file", "/var/log/ralph/qchat.log"),
    ("QCHAT_VERBOSE", "1", "logging.verbose", True),
    ("QCHAT_DEBUG", "1", "logging.debug", True),
    ("HEALTH_CHECK_ENABLED", "false", "monitoring.health_check_enabled", False),
    ("HEALTH_CHECK_INTERVAL", "30", "monitoring.health_check_interval", 30.0),
    ("QCHAT_HEALTH_HOST", "0.0.0.0", "monitoring.health_check_host", "0.0.0.0"),
    ("QCHAT_HEALTH_PORT", "9090", "monitoring.health_check_port", 9090),
    ("QCHAT_CONSOLE_TOKEN", "s3cret", "monitoring.console_token", "s3cret"),
    ("QCHAT_CACHE_ENABLED", "off", "cache.enabled", False),
    ("QCHAT_STATE_DIR", "/srv/state", "state.dir", "/srv/state"),
]


def test_every_env_var_of_the_schema_has_a_case() -> None:
    assert sorted(name for name, *_ in ENV_CASES) == ENV_NAMES


@pytest.mark.parametrize(("name", "text", "key", "expected"), ENV_CASES)
def test_env_var(name: str, text: str, key: str, expected: Any) -> None:
    config = load_config(env={name: text})
    assert config.get(key) == expected
    assert config.sources[key] == f"env {name}"


@pytest.mark.parametrize("name", ENV_NAMES)
def test_empty_env_var_counts_as_unset(name: str) -> None:
    config = load_config(env={name: ""})
    assert config == Config()
    assert set(config.sources.values()) == {"default"}
    assert load_config(env={name: "  "}) == Config()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("Yes", True),
        ("on", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("OFF", False),
    ],
)
def test_env_booleans(text: str, expected: bool) -> None:
    assert load_config(env={"QCHAT_VERBOSE": text}).logging.verbose is expected


def test_env_boolean_rejects_other_words() -> None:
    assert only_problem(env={"QCHAT_DEBUG": "maybe"}) == (
        "env QCHAT_DEBUG: logging.debug: expected a boolean: 1/0, true/false, "
        "yes/no or on/off, got 'maybe'"
    )


def test_env_values_are_stripped() -> None:
    config = load_config(env={"QCHAT_MODEL": " claude \n", "QCHAT_TIMEOUT": "300 "})
    assert config.adapter.model == "claude"
    assert config.adapter.timeout == 300.0


def test_env_null_for_a_nullable_number() -> None:
    config = load_config(env={"QCHAT_MAX_MEMORY_MB": "null"})
    assert config.resources.max_memory_mb is None
    assert config.sources["resources.max_memory_mb"] == "env QCHAT_MAX_MEMORY_MB"


def test_env_null_for_a_string_is_the_string() -> None:
    assert load_config(env={"QCHAT_MODEL": "none"}).adapter.model == "none"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("QCHAT_TIMEOUT", "ten", "a positive number of seconds"),
        ("QCHAT_TIMEOUT", "0", "a positive number of seconds"),
        ("QCHAT_TIMEOUT", "nan", "a positive number of seconds"),
        ("QCHAT_MAX_RETRIES", "-1", "an integer >= 0"),
        ("QCHAT_MAX_RETRIES", "2.5", "an integer >= 0"),
        ("QCHAT_MAX_CONCURRENT", "ten", "a positive integer"),
        ("QCHAT_HEALTH_PORT", "70000", "an integer from 0 to 65535"),
        ("QCHAT_AGENT", "gpt", "one of q, qchat, kiro, sim, claude, gemini, codex, custom"),
        ("QCHAT_LOG_LEVEL", "loud", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ],
)
def test_env_bad_values(name: str, text: str, expected: str) -> None:
    key = next(key for key, item in SETTINGS.items() if item.env == name)
    assert only_problem(env={name: text}) == (
        f"env {name}: {key}: expected {expected}, got {text!r}"
    )


def test_env_problems_are_all_reported() -> None:
    problems = problems_of(env={"QCHAT_TIMEOUT": "x", "QCHAT_BUFFER_SIZE": "y"})
    assert problems == [
        "env QCHAT_TIMEOUT: adapter.timeout: expected a positive number of seconds, got 'x'",
        "env QCHAT_BUFFER_SIZE: performance.buffer_size: expected a positive integer, got 'y'",
    ]


def test_qchat_command_splits_like_a_shell() -> None:
    config = load_config(env={"QCHAT_COMMAND": "/opt/q/bin/q chat --agent 'my agent' \"a b\""})
    assert config.adapter.command == ("/opt/q/bin/q", "chat", "--agent", "my agent", "a b")


def test_qchat_command_with_a_bad_quote() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env={"QCHAT_COMMAND": 'q chat "unclosed'})
    message = str(caught.value)
    assert message.startswith("env QCHAT_COMMAND: adapter.command: expected a command line")
    assert "No closing quotation" in message


def test_adapter_command_in_yaml_as_list_or_string(tmp_path: Path) -> None:
    as_list = write(tmp_path, "adapter:\n  command: [q, chat, --no-interactive]\n", "a.yaml")
    as_text = write(tmp_path, "adapter:\n  command: q chat --no-interactive\n", "b.yaml")
    expected = ("q", "chat", "--no-interactive")
    assert load_config(as_list, env={}).adapter.command == expected
    assert load_config(as_text, env={}).adapter.command == expected

    empty = write(tmp_path, "adapter:\n  command: []\n", "c.yaml")
    assert (
        only_problem(empty) == f"{empty}:2: adapter.command: expected a non-empty command, got []"
    )


# ---------------------------------------------------------------------------
# Checks on values, and the message shape.

LEVELS = "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
POLICIES = "one of least-recently-stored, least-recently-used, least-frequently-used, none"
POSITIVE_SECONDS = "a positive number of seconds"

# (section, "key: value" in the file, what was expected, how the value shows)
BAD_VALUES = [
    ("performance", "max_concurrent: ten", "a positive integer", "'ten'"),
    ("performance", "max_concurrent: 0", "a positive integer", "0"),
    ("performance", "max_concurrent: true", "a positive integer", "True"),
    ("performance", "buffer_size: 4096.0", "a positive integer", "4096.0"),
    ("adapter", "timeout: -1", POSITIVE_SECONDS, "-1"),
    ("adapter", "timeout: .inf", POSITIVE_SECONDS, "inf"),
    ("adapter", "timeout: .nan", POSITIVE_SECONDS, "nan"),
    ("adapter", "timeout: 1.0e+400", POSITIVE_SECONDS, "inf"),
    ("adapter", "timeout: false", POSITIVE_SECONDS, "False"),
    ("adapter", "timeout:", POSITIVE_SECONDS, "None"),
    ("adapter", "retry_delay: -0.5", "a number of seconds >= 0", "-0.5"),
    ("adapter", "max_retries: -1", "an integer >= 0", "-1"),
    ("adapter", "name: gpt", "one of q, qchat, kiro, sim, claude, gemini, codex, custom", "'gpt'"),
    ("adapter", "model: ''", "a non-empty string or null", "''"),
    ("logging", "verbose: 1", "true or false", "1"),
    ("logging", "verbose: 'yes'", "true or false", "'yes'"),
    ("logging", "level: loud", LEVELS, "'loud'"),
    ("monitoring", "health_check_port: 65536", "an integer from 0 to 65535", "65536"),
    ("resources", "max_memory_mb: 0", "a positive integer or null", "0"),
    ("cache", "eviction_policy: random", POLICIES, "'random'"),
    ("breaker", "storage: redis", "one of memory, disk", "'redis'"),
    ("state", "backend: etcd", "one of local, redis", "'etcd'"),
    ("limits", "requests_per_minute: 0", "a positive number or null", "0"),
    ("security", "blocked_patterns: rm -rf", "a list of regular expressions", "'rm -rf'"),
]


@pytest.mark.parametrize(("section", "line", "expected", "got"), BAD_VALUES)
def test_bad_value_message(
    tmp_path: Path, section: str, line: str, expected: str, got: str
) -> None:
    path = write(tmp_path, f"{section}:\n  {line}\n")
    key = f"{section}.{line.partition(':')[0]}"
    assert only_problem(path) == f"{path}:2: {key}: expected {expected}, got {got}"


def test_bad_top_level_value_message(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks: {workdir: /srv}\n")
    assert only_problem(path) == (
        f"{path}:1: tasks: expected a list of tasks, each a mapping with a workdir, "
        "got {'workdir': '/srv'}"
    )


def test_the_design_example_message(tmp_path: Path) -> None:
    path = write(tmp_path, "performance:\n  max_concurrent: ten\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == (
        f"{path}:2: performance.max_concurrent: expected a positive integer, got 'ten'"
    )
    assert isinstance(caught.value, ValueError)


def test_floats_accept_ints_and_ints_reject_bools(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter:\n  timeout: 300\nperformance:\n  poll_interval: 1\n")
    config = load_config(path, env={})
    assert config.adapter.timeout == 300.0 and isinstance(config.adapter.timeout, float)
    assert isinstance(config.performance.poll_interval, float)

    with pytest.raises(ConfigError, match="got True"):
        load_config(env={}, overrides={"adapter.max_retries": True})


def test_case_insensitive_level_and_choices(tmp_path: Path) -> None:
    path = write(tmp_path, "logging:\n  level: warning\nadapter:\n  name: QChat\n")
    config = load_config(path, env={})
    assert config.logging.level == "WARNING"
    assert config.adapter.name == "qchat"
    assert config.agent_name == "q"


def test_logging_format_strings(tmp_path: Path) -> None:
    assert load_config(env={}, overrides={"logging.format": "TEXT"}).logging.format == "text"
    fmt = "%(levelname)s %(message)s"
    assert load_config(env={}, overrides={"logging.format": fmt}).logging.format == fmt

    # Fields that our own log records add are fine.
    custom = "%(asctime)s %(request_id)s %(message)s"
    assert load_config(env={}, overrides={"logging.format": custom}).logging.format == custom

    for bad in ("no fields here", "%(message)s 100%", "%(message)q"):
        problem = only_problem(overrides={"logging.format": bad})
        assert problem.startswith(
            "override: logging.format: expected json, text, or a logging format string ("
        ), problem


def test_huge_numbers_are_refused() -> None:
    assert only_problem(overrides={"adapter.timeout": 10**400}) == (
        "override: adapter.timeout: expected a positive number of seconds, got " + _short(10**400)
    )
    assert "no larger than" in only_problem(overrides={"adapter.timeout": 1e300})
    assert "no larger than" in only_problem(overrides={"performance.buffer_size": 2**70})
    assert "got 'inf'" in only_problem(env={"QCHAT_TIMEOUT": "inf"})
    assert "got '1e400'" in only_problem(env={"QCHAT_TIMEOUT": "1e400"})
    assert "QCHAT_BUFFER_SIZE" in only_problem(env={"QCHAT_BUFFER_SIZE": "9" * 5000})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def test_a_5000_digit_integer_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"adapter:\n  max_retries: {'9' * 5000}\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:2: adapter.max_retries: cannot read the value:")
    assert len(problem) - len(str(path)) < 150


def test_strings_with_nul_are_refused() -> None:
    problem = only_problem(overrides={"loop.prompt_file": "a\x00b"})
    assert problem.startswith("override: loop.prompt_file: expected a path without NUL")


# ---------------------------------------------------------------------------
# Regexes, failure patterns, tasks, agents, state backend.


def test_blocked_patterns(tmp_path: Path) -> None:
    path = write(tmp_path, "security:\n  blocked_patterns: ['rm -rf /', '(?i)drop table']\n")
    assert load_config(path, env={}).security.blocked_patterns == ("rm -rf /", "(?i)drop table")

    bad = write(tmp_path, "security:\n  blocked_patterns: [ok, '(bad']\n", "bad.yaml")
    problem = only_problem(bad)
    assert problem.startswith(
        f"{bad}:2: security.blocked_patterns[1]: expected a valid regular expression ("
    )
    assert problem.endswith("got '(bad'")

    empty = only_problem(overrides={"security.blocked_patterns": [""]})
    assert "blocked_patterns[0]: expected a non-empty regular expression" in empty


def test_failure_patterns(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "adapter:\n"
        "  failure_patterns:\n"
        "    throttled: ['(?i)too many requests']\n"
        "    auth: ['expired token', 'not logged in']\n",
    )
    patterns = load_config(path, env={}).adapter.failure_patterns
    assert dict(patterns) == {
        "throttled": ("(?i)too many requests",),
        "auth": ("expired token", "not logged in"),
    }

    unknown = only_problem(overrides={"adapter.failure_patterns": {"slow": ["x"]}})
    assert unknown == (
        "override: adapter.failure_patterns: expected a failure kind: "
        "throttled, auth, service, got 'slow'"
    )
    bad = only_problem(overrides={"adapter.failure_patterns": {"service": ["ok", "[x"]}})
    assert bad.startswith(
        "override: adapter.failure_patterns.service[1]: expected a valid regular expression"
    )


def test_tasks(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "loop:\n"
        "  prompt_file: TASK.md\n"
        "tasks:\n"
        "  - workdir: /srv/app/\n"
        "  - name: docs\n"
        "    workdir: /srv/app/docs\n"
        "    prompt_file: DOCS.md\n",
    )
    config = load_config(path, env={})
    assert config.tasks == (
        TaskConfig(name="app", workdir="/srv/app/", prompt_file="TASK.md"),
        TaskConfig(name="docs", workdir="/srv/app/docs", prompt_file="DOCS.md"),
    )
    assert config.sources["tasks"] == f"{path}:3"


@pytest.mark.parametrize(
    ("tasks", "problem"),
    [
        ([{"name": "a"}], "tasks[0].workdir: expected a path, got None"),
        ([{"workdir": "/a", "prompt": "x"}], "tasks[0]: expected only keys name, workdir, "
         "prompt_file, got 'prompt'"),
        (["/srv/a"], "tasks[0]: expected a mapping with workdir, name, prompt_file, got '/srv/a'"),
        ([{"workdir": "/x/a"}, {"workdir": "/y/a"}],
         "tasks[1].name: expected a unique name (tasks[0] has it), got 'a'"),
        ([{"workdir": "/a", "prompt_file": 3}], "tasks[0].prompt_file: expected a path, got 3"),
    ],
)  # fmt: skip
def test_bad_tasks(tasks: list[Any], problem: str) -> None:
    assert only_problem(overrides={"tasks": tasks}) == f"override: {problem}"


def test_agents_are_checked_by_the_settings_they_stand_for() -> None:
    agents = [
        {"name": "q"},
        {"name": "backup", "profile": "kiro", "timeout": 30, "breaker": {"fail_max": 2}},
    ]
    config = load_config(env={}, overrides={"agents": agents})
    assert config.agent_strategy == "failover"
    assert config.agents["list"] == (
        {"name": "q", "profile": "q"},
        {"name": "backup", "profile": "kiro", "timeout": 30.0, "breaker": {"fail_max": 2}},
    )
    named = {name: agent for name, agent in config.agent_configs()}
    assert named["backup"].adapter.name == "kiro"
    assert named["backup"].adapter.timeout == 30.0
    assert named["backup"].breaker.fail_max == 2
    assert named["q"].breaker.fail_max == 5

    round_robin = {"strategy": "round_robin", "list": agents}
    assert load_config(env={}, overrides={"agents": round_robin}).agent_strategy == "round_robin"

    assert only_problem(overrides={"agents": [{"command": "x"}]}) == (
        "override: agents[0].name: expected a non-empty name, got None"
    )
    assert only_problem(overrides={"agents": [{"name": "backup"}]}).startswith(
        "override: agents[0].profile: expected one of q, qchat, kiro"
    )
    assert only_problem(overrides={"agents": [{"name": "q", "timeout": -1}]}) == (
        "override: agents[0].timeout: expected a positive number of seconds, got -1"
    )
    assert only_problem(overrides={"agents": [{"name": "q", "breaker": {"fail_mx": 1}}]}) == (
        "override: agents[0].breaker.fail_mx: expected a known setting, got 'fail_mx'"
    )
    assert only_problem(overrides={"agents": [{"name": "x", "profile": "custom"}]}) == (
        "override: agents[0].command: expected a command for the custom profile, got None"
    )
    assert only_problem(overrides={"agents": {"strategy": "random"}}).startswith(
        "override: agents.strategy: expected one of failover, round_robin"
    )
    assert only_problem(overrides={"agents": "q"}).startswith(
        "override: agents: expected a list of agents"
    )


def test_redis_backend_needs_a_url(tmp_path: Path) -> None:
    path = write(tmp_path, "state:\n  backend: redis\n")
    assert only_problem(path) == (
        f"{path}:2: state.redis_url: expected a redis URL when state.backend is 'redis', got None"
    )

    config = load_config(path, env={}, overrides={"state.redis_url": "redis://localhost:6379/0"})
    assert config.state.backend == "redis"


# ---------------------------------------------------------------------------
# Unknown keys, and many problems at once.


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("adapter:\n  timout: 5\n",
         ":2: unknown key 'adapter.timout' (did you mean 'adapter.timeout'?)"),
        ("adaptr:\n  timeout: 5\n", ":1: unknown key 'adaptr' (did you mean 'adapter'?)"),
        ("timeout: 5\n", ":1: unknown key 'timeout' (did you mean 'adapter.timeout'?)"),
        ("adapter:\n  buffer_size: 5\n",
         ":2: unknown key 'adapter.buffer_size' (did you mean 'performance.buffer_size'?)"),
        ("zzzz: 1\n", ":1: unknown key 'zzzz'"),
    ],
)  # fmt: skip
def test_unknown_keys_suggest_the_nearest(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    assert only_problem(path) == f"{path}{problem}"


def test_unknown_override_key() -> None:
    assert only_problem(overrides={"adapter.timout": 5}) == (
        "override: unknown key 'adapter.timout' (did you mean 'adapter.timeout'?)"
    )
    assert only_problem(overrides={"adapter": {"timeout": 5}}) == (
        "override: adapter: expected a dotted key such as 'adapter.<name>'"
    )


def test_every_problem_is_collected_in_line_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "adapter:\n"
        "  timeout: 0\n"
        "  timout: 5\n"
        "performance:\n"
        "  max_concurrent: ten\n"
        "  max_concurrent: 3\n"
        "bogus: 1\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"QCHAT_MAX_RETRIES": "x"}, overrides={"cache.ttl": -1})

    problems = caught.value.problems
    assert problems == [
        f"{path}:2: adapter.timeout: expected a positive number of seconds, got 0",
        f"{path}:3: unknown key 'adapter.timout' (did you mean 'adapter.timeout'?)",
        f"{path}:5: performance.max_concurrent: expected a positive integer, got 'ten'",
        f"{path}:6: duplicate key 'performance.max_concurrent' (first on line 5)",
        f"{path}:7: unknown key 'bogus'",
        "env QCHAT_MAX_RETRIES: adapter.max_retries: expected an integer >= 0, got 'x'",
        "override: cache.ttl: expected a positive number of seconds, got -1",
    ]
    assert str(caught.value) == problems[0] + " (and 6 more)"


def test_a_bad_file_value_is_reported_even_when_env_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter:\n  timeout: soon\n")
    assert only_problem(path, env={"QCHAT_TIMEOUT": "30"}).startswith(f"{path}:2:")


# ---------------------------------------------------------------------------
# The file itself.


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "# only a comment\n# and another\n", "---\n", "adapter:\n", "adapter: ~\n"],
)
def test_files_that_mean_the_defaults(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, text), env={})
    assert config == Config()


@pytest.mark.parametrize(
    ("text", "got"),
    [("- adapter\n- logging\n", "a list"), ("just words\n", "'just words'"), ("42\n", "'42'")],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    path = write(tmp_path, text)
    assert only_problem(path) == (
        f"{path}:1: expected a mapping of sections at the top level, got {got}"
    )


def test_a_section_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "logging: INFO\n")
    assert only_problem(path) == f"{path}:1: logging: expected a mapping of settings, got 'INFO'"


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter:\n  timeout: 5\n  name: [q\nlogging:\n  level: INFO\n")
    problem = only_problem(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: invalid YAML: ", problem), problem

    tabs = write(tmp_path, "adapter:\n\ttimeout: 5\n", "tabs.yaml")
    assert only_problem(tabs).startswith(f"{tabs}:2: invalid YAML: ")


def test_a_key_must_be_a_name(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter:\n  ? [a, b]\n  : 1\n")
    assert only_problem(path) == f"{path}:2: adapter: expected a key name, got a list"


def test_two_documents_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter: {}\n---\nlogging: {}\n")
    assert "invalid YAML" in only_problem(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert only_problem(path) == f"{path}: cannot read the file: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert only_problem(tmp_path).startswith(f"{tmp_path}: cannot read the file:")


def test_binary_and_control_characters(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"adapter:\n  name: q\n\xff\xfe\x00")
    assert only_problem(binary) == f"{binary}:3: not UTF-8 text"

    nul = write(tmp_path, "adapter:\n  name: q\x00\n", "nul.yaml")
    assert only_problem(nul).startswith(f"{nul}:2: invalid YAML: ")


def test_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("w") as stream:
        stream.write("# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    assert "larger than" in only_problem(path)


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        items = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{items}]")
    path = write(tmp_path, "\n".join(lines) + "\n")

    started = time.monotonic()
    problem = only_problem(path)
    assert time.monotonic() - started < 2
    assert (
        problem
        == f"{path}:2: invalid YAML: aliases (*name) are not allowed in this file (column 10)"
    )


def test_deep_nesting_is_refused_not_crashed(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks: " + "[" * 50000 + "]" * 50000 + "\n")
    assert only_problem(path)


@pytest.mark.parametrize(
    "text",
    [
        "adapter:\n  name: !!python/object/apply:os.system ['touch pwned']\n",
        "adapter: !!python/name:os.system\n",
        "adapter:\n  name: !custom q\n",
    ],
)
def test_only_safe_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert only_problem(path)
    assert not (Path.cwd() / "pwned").exists()


def test_odd_yaml_types_are_plain_mismatches(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter:\n  model: 2024-01-02\n  timeout: !!binary aGVsbG8=\n")
    problems = problems_of(path)
    assert problems[0] == (
        f"{path}:2: adapter.model: expected a non-empty string or null, "
        "got datetime.date(2024, 1, 2)"
    )
    assert problems[1].startswith(f"{path}:3: adapter.timeout: expected a positive number")


def test_path_of_the_wrong_type() -> None:
    with pytest.raises(ConfigError, match="expected a path"):
        load_config(42, env={})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# The deployment guide, and the documented example.


def test_the_guide_file_loads_as_is(tmp_path: Path) -> None:
    path = write(tmp_path, GUIDE_FILE)
    config = load_config(path, env={})

    assert config.adapter.name == "qchat"
    assert config.agent_name == "q"
    assert config.adapter.timeout == 300.0
    assert config.adapter.max_retries == 5
    assert config.adapter.retry_delay == 2.0
    assert config.performance.buffer_size == 8192
    assert config.performance.poll_interval == 0.1
    assert config.performance.max_concurrent == 10
    assert config.logging.level == "INFO"
    assert config.logging.format == "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
    assert config.logging.file == "/var/log/ralph/qchat.log"
    assert config.monitoring.metrics_enabled is True
    assert config.monitoring.metrics_interval == 60
    assert config.monitoring.health_check_port == 8080
    assert config.sources["monitoring.health_check_port"] == f"{path}:21"


def test_the_guide_env_vars_together(tmp_path: Path) -> None:
    env = {
        "QCHAT_TIMEOUT": "300",
        "QCHAT_MAX_RETRIES": "10",
        "QCHAT_RETRY_DELAY": "5",
        "QCHAT_VERBOSE": "1",
        "QCHAT_DEBUG": "1",
        "QCHAT_BUFFER_SIZE": "16384",
        "QCHAT_POLL_INTERVAL": "0.5",
        "QCHAT_MAX_CONCURRENT": "20",
        "QCHAT_MAX_MEMORY_MB": "4096",
        "QCHAT_MAX_OUTPUT_SIZE": "10485760",
        "HEALTH_CHECK_ENABLED": "true",
        "HEALTH_CHECK_INTERVAL": "30",
        "ENVIRONMENT": "production",
        "PYTHONUNBUFFERED": "1",
    }
    config = load_config(write(tmp_path, GUIDE_FILE), env=env)

    assert config.adapter.max_retries == 10
    assert config.adapter.retry_delay == 5.0
    assert config.logging.verbose is True
    assert config.logging.debug is True
    assert config.performance.buffer_size == 16384
    assert config.performance.poll_interval == 0.5
    assert config.performance.max_concurrent == 20
    assert config.resources.max_memory_mb == 4096
    assert config.monitoring.health_check_enabled is True
    assert config.monitoring.health_check_interval == 30.0


def test_the_example_file_is_the_schema_at_its_defaults() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert text == render_example(), "regenerate: ralph-supervisor config example"

    config = load_config(EXAMPLE, env={})
    assert config == Config()
    assert all(source.startswith(f"{EXAMPLE}:") for source in config.sources.values())

    for key in SETTINGS:
        section, _, name = key.rpartition(".")
        if section:
            assert re.search(rf"^{section}:$(.|\n)*?^  {name}:", text, re.M), key
        else:
            assert re.search(rf"^{name}:", text, re.M), key

    for item in SETTINGS.values():
        if item.env:
            assert f"env {item.env}" in text
    assert max(len(line) for line in text.splitlines()) < 100


# ---------------------------------------------------------------------------
# describe (config show).


def test_describe_notes_every_source(tmp_path: Path) -> None:
    path = write(tmp_path, GUIDE_FILE)
    config = load_config(path, env={"QCHAT_VERBOSE": "1"}, overrides={"cache.ttl": 60})
    text = describe(config)

    for section in SECTIONS:
        assert f"\n{section}:\n" in text
    for key in SETTINGS:
        assert re.search(rf"^ *{key.rpartition('.')[2]}: ", text, re.M), key
    assert re.search(rf"  timeout: 300.0 +# from {re.escape(str(path))}:4\n", text)
    assert re.search(r"  verbose: true +# from env QCHAT_VERBOSE\n", text)
    assert re.search(r"  ttl: 60.0 +# from override\n", text)
    assert re.search(r"  buffer_size: 8192 ", text)


def test_describe_hides_secrets() -> None:
    config = load_config(
        env={"QCHAT_CONSOLE_TOKEN": "hunter2"},
        overrides={"state.redis_url": "redis://user:pa55@cache:6379/0"},
    )
    text = describe(config)
    assert "hunter2" not in text
    assert "pa55" not in text
    assert "redis://user:***@cache:6379/0" in text

    ipv6 = load_config(env={}, overrides={"state.redis_url": "redis://:pw@[::1]:6379"})
    assert "redis_url: redis://:***@[::1]:6379 " in describe(ipv6)


def test_describe_reads_back_as_the_same_config(tmp_path: Path) -> None:
    overrides = {
        "adapter.command": ["q", "chat", 'it\'s "quoted"\n'],
        "adapter.failure_patterns": {"auth": ["expired: .*"]},
        "tasks": [{"workdir": "/srv/app"}],
        "agents": [{"name": "kiro", "breaker": {"fail_max": 2}}],
        "loop.completion_promise": "yes",
    }
    config = load_config(write(tmp_path, GUIDE_FILE), env={}, overrides=overrides)
    again = load_config(write(tmp_path, describe(config), "shown.yaml"), env={})
    assert again == config


# ---------------------------------------------------------------------------
# The state directory.


def test_state_dir_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    defaults = load_config(env={})

    assert defaults.state_dir_for(None) == tmp_path / "home/.local/state/ralph-supervisor"
    assert defaults.state_dir_for("/srv/app") == Path("/srv/app/.ralph")
    assert defaults.state_dir_for("app") == tmp_path / "app/.ralph"

    absolute = load_config(env={"QCHAT_STATE_DIR": "/var/lib/ralph"})
    assert absolute.state_dir_for("/srv/app") == Path("/var/lib/ralph")
    assert absolute.state_dir_for(None) == Path("/var/lib/ralph")

    relative = load_config(env={"QCHAT_STATE_DIR": "state"})
    assert relative.state_dir_for("/srv/app") == Path("/srv/app/state")
    assert relative.state_dir_for(None) == tmp_path / "state"

    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "home").exists()


def test_ensure_private_dir(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = ensure_private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)

    assert target.is_dir()
    for part in (tmp_path / "a", tmp_path / "a/b", target):
        assert stat.S_IMODE(part.stat().st_mode) == 0o700, part

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    ensure_private_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755

    ensure_private_dir(target)  # already there: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        ensure_private_dir(tmp_path / "file")


# ---------------------------------------------------------------------------
# Properties: any input loads or raises ConfigError, never anything else.

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["q", "json", "INFO", "redis", "disk", "(", "[a-z]+", "a 'b", "/srv/x"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["name", "workdir", "prompt_file", "throttled", "auth", "x"])
            | st.text(max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
words = st.text(min_size=1, max_size=12)
regexes = st.lists(st.sampled_from(["a", "(?i)slow down", "^b$", "x{2,}"]), max_size=3)


def good_values(check: Check) -> st.SearchStrategy[Any]:
    """Values a check should mostly accept, so the fuzz gets past the first key."""
    if isinstance(check, Nullable):
        return st.none() | good_values(check.inner)
    if isinstance(check, Integer):
        return st.integers(check.minimum, min(check.maximum, 10**6))
    if isinstance(check, Number):
        return st.floats(min_value=0.001, max_value=1e6) | st.integers(1, 1000)
    if isinstance(check, Flag):
        return st.booleans()
    if isinstance(check, Choice):
        return st.sampled_from(check.choices)
    if isinstance(check, LogFormat):
        return st.sampled_from(["json", "TEXT", "%(levelname)s %(message)s"])
    if isinstance(check, Text):
        return words
    if isinstance(check, Command):
        return st.lists(words, min_size=1, max_size=3) | st.sampled_from(["q chat", "kiro-cli"])
    if isinstance(check, Patterns):
        return regexes
    if isinstance(check, PatternsByKind):
        return st.dictionaries(st.sampled_from(FAILURE_KINDS), regexes)
    if isinstance(check, TaskList):
        task = st.fixed_dictionaries(
            {"workdir": words}, optional={"name": words, "prompt_file": words}
        )
        return st.lists(task, max_size=3)
    if isinstance(check, AgentList):
        agent = st.fixed_dictionaries({"name": words}, optional={"extra": values})
        return st.lists(agent, max_size=3)
    raise AssertionError(f"no strategy for {check!r}")


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # Nine in ten good: enough bad values to probe, enough good ones that
    # whole documents load and describe() gets exercised too.
    return st.integers(0, 9).flatmap(lambda pick: good if pick else bad)


def plausible(key: str) -> st.SearchStrategy[Any]:
    return mostly(good_values(SETTINGS[key].check), values)


def section_body(section: str) -> st.SearchStrategy[Any]:
    keys = [key for key in SETTINGS if key.startswith(f"{section}.")]
    chosen = st.lists(st.sampled_from(keys), unique=True, max_size=len(keys))
    known = chosen.flatmap(
        lambda picked: st.fixed_dictionaries(
            {key.partition(".")[2]: plausible(key) for key in picked}
        )
    )
    return mostly(known, st.dictionaries(words, values, max_size=3) | values)


documents = mostly(
    st.fixed_dictionaries(
        {},
        optional={
            **{section: section_body(section) for section in SECTIONS},
            "tasks": plausible("tasks"),
            "agents": plausible("agents"),
        },
    ),
    st.dictionaries(st.text(max_size=10), values, max_size=4),
)

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


HIDDEN_IN_SHOW = ("monitoring.console_token", "state.redis_url")


def load_or_config_error(**kwargs: Any) -> Config | None:
    try:
        return load_config(**kwargs)
    except ConfigError as error:
        assert "internal error" not in str(error), error
        assert error.problems and all(isinstance(p, str) for p in error.problems)
        return None


@PROPERTY
@given(document=documents)
def test_any_document_loads_or_raises_config_error(document: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.yaml"
        path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
        config = load_or_config_error(path=path, env={})

        # Whatever loads, config show can show, and it reads back the same
        # but for the secrets that it hides.
        if config is not None:
            shown = Path(directory) / "shown.yaml"
            shown.write_text(describe(config), encoding="utf-8")
            secrets = {key: config.get(key) for key in HIDDEN_IN_SHOW}
            assert load_config(shown, env={}).with_overrides(secrets) == config


@PROPERTY
@given(text=st.text(max_size=300))
def test_any_text_loads_or_raises_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        load_or_config_error(path=path, env={})


@PROPERTY
@given(env=st.dictionaries(st.sampled_from(ENV_NAMES), st.text(max_size=30)))
def test_any_environment_loads_or_raises_config_error(env: dict[str, str]) -> None:
    config = load_or_config_error(env=env)
    if config is not None:
        describe(config)


@PROPERTY
@given(
    overrides=st.lists(st.sampled_from(list(SETTINGS)), unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({key: plausible(key) for key in keys})
    )
    | st.dictionaries(st.text(max_size=12), values, max_size=3)
)
def test_any_overrides_load_or_raise_config_error(overrides: dict[str, Any]) -> None:
    config = load_or_config_error(env={}, overrides=overrides)
    if config is not None:
        assert config.with_overrides({}) == config

    # with_overrides makes the same promise as load_config.
    try:
        changed = Config().with_overrides(overrides)
    except ConfigError as error:
        assert config is None
        assert "internal error" not in str(error), error
    else:
        assert changed == config


def test_numbers_near_the_edges() -> None:
    for value in (math.ulp(0.0), 1e-300, 9223372036.0):
        assert load_config(env={}, overrides={"adapter.timeout": value}).adapter.timeout == value
    assert load_config(env={}, overrides={"performance.buffer_size": 2**63 - 1})
