"""Several agents, each with its own breaker: failover on real processes.

Each test agent is a small script whose behaviour is read from a mode file
at every call, so a test can make an agent throttle, lose its login or
recover while the supervisor runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config

from ralph_supervisor.adapter import CachedAdapter, QChatAdapter
from ralph_supervisor.agents import PROFILES, CompiledPatterns
from ralph_supervisor.errors import (
    CircuitOpen,
    OutputTooLarge,
    QChatAuthError,
    QChatTimeout,
)
from ralph_supervisor.runner import CallSpec, Limits, run_call
from ralph_supervisor.supervisor import Supervisor

MODE_AGENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    name, mode_file, calls_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    with calls_file.open("a") as calls:
        calls.write(name + "\\n")
    mode = mode_file.read_text().strip() if mode_file.exists() else "healthy"
    if mode == "throttled":
        print("error: rate limit reached. Please wait a moment and try again.", file=sys.stderr)
    elif mode == "auth":
        print("error: You are not logged in, please log in with q login", file=sys.stderr)
    elif mode == "huge":
        sys.stdout.write("x" * 200000)
    else:
        print(f"answer from {name}")
    """
)


class Agents:
    """Mode-file agents for one test."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.script = tmp_path / "agent.py"
        self.script.write_text(MODE_AGENT)
        self.calls = tmp_path / "calls.log"

    def entry(self, name: str, mode: str = "healthy", **settings: object) -> dict:
        self.set(name, mode)
        command = [sys.executable, str(self.script), name, str(self.mode_file(name))]
        command.append(str(self.calls))
        # The sim profile with our command keeps q's failure patterns.
        return {"name": name, "profile": "sim", "command": command, **settings}

    def mode_file(self, name: str) -> Path:
        return self.dir / f"mode-{name}"

    def set(self, name: str, mode: str) -> None:
        self.mode_file(name).write_text(mode)

    def called(self) -> list[str]:
        return self.calls.read_text().split() if self.calls.exists() else []


def failover_config(tmp_path: Path, agents: object, **overrides: object) -> Any:
    settings: dict[str, object] = {
        "agents": agents,
        "adapter__max_retries": 0,
        "breaker__fail_max": 2,
        "breaker__reset_timeout": 0.6,
        "breaker__storage": "disk",
        "cache__enabled": False,
    }
    settings.update(overrides)
    return make_config(tmp_path, **settings)


def test_calls_land_on_the_healthy_agent_and_breakers_open_one_by_one(tmp_path: Path) -> None:
    agents = Agents(tmp_path)
    config = failover_config(
        tmp_path,
        [
            agents.entry("throttler", "throttled"),
            agents.entry("expired", "auth"),
            agents.entry("healthy"),
        ],
    )
    adapter = QChatAdapter(config)
    by_name = {guard.name: guard for guard in adapter.agents.guards}

    first = adapter.execute("hello")
    assert first.agent == "healthy"
    assert first.text.strip() == "answer from healthy"
    assert first.attempts == 3
    # A login error takes its agent out at once; throttling counts to fail_max.
    assert by_name["expired"].breaker.state == "open"
    assert by_name["throttler"].breaker.state == "closed"

    assert adapter.execute("hello again").agent == "healthy"
    assert by_name["throttler"].breaker.state == "open"

    # Both open: only the healthy agent is called now.
    before = len(agents.called())
    assert adapter.execute("third").agent == "healthy"
    assert agents.called()[before:] == ["healthy"]

    # The first agent recovers; after its reset it takes the calls back.
    agents.set("throttler", "healthy")
    time.sleep(0.7)
    assert adapter.execute("fourth").agent == "throttler"
    assert by_name["throttler"].breaker.state == "closed"
    assert adapter.execute("fifth").agent == "throttler"


def test_supervisor_fails_over_and_reports_agents(tmp_path: Path) -> None:
    agents = Agents(tmp_path)
    config = failover_config(
        tmp_path,
        [agents.entry("primary", "throttled"), agents.entry("backup")],
        performance__max_concurrent=2,
        breaker__reset_timeout=60,  # no trial of primary within the test
    )
    with Supervisor(config) as supervisor:
        responses = [supervisor.execute(f"task {i}") for i in range(4)]
        stats = supervisor.stats()

    assert [r.agent for r in responses] == ["backup"] * 4
    assert stats["failovers"] == 2  # until primary's breaker opened
    named = {agent["name"]: agent for agent in stats["agents"]}
    assert named["primary"]["breaker"]["state"] == "open"
    assert named["backup"]["successes"] == 4
    assert agents.called().count("primary") == 2


def test_every_breaker_open_fails_at_once_naming_each_agent(tmp_path: Path) -> None:
    agents = Agents(tmp_path)
    config = failover_config(
        tmp_path,
        [agents.entry("one", "auth"), agents.entry("two", "auth")],
        breaker__reset_timeout=60,
    )
    adapter = QChatAdapter(config)
    with pytest.raises(QChatAuthError):
        adapter.execute("hello")

    calls_before = len(agents.called())
    started = time.monotonic()
    with pytest.raises(CircuitOpen) as caught:
        adapter.execute("hello")
    assert time.monotonic() - started < 0.5
    assert "one: next trial in" in str(caught.value)
    assert "two: next trial in" in str(caught.value)
    assert caught.value.retry_at is not None
    assert len(agents.called()) == calls_before

    with Supervisor(config) as supervisor:
        error = supervisor.submit("hello").exception(timeout=5)
    assert isinstance(error, CircuitOpen)
    assert "every agent's circuit is open" in str(error)


def test_prompt_faults_do_not_fail_over(tmp_path: Path) -> None:
    agents = Agents(tmp_path)
    config = failover_config(
        tmp_path,
        [agents.entry("first", "huge"), agents.entry("second")],
        resources__max_output_size=100_000,
    )
    with pytest.raises(OutputTooLarge):
        QChatAdapter(config).execute("hello")
    assert agents.called() == ["first"]


def test_round_robin_alternates_among_healthy_agents(tmp_path: Path) -> None:
    agents = Agents(tmp_path)
    config = failover_config(
        tmp_path,
        {"strategy": "round_robin", "list": [agents.entry("a"), agents.entry("b")]},
    )
    adapter = QChatAdapter(config)
    answered = [adapter.execute(f"call {i}").agent for i in range(4)]
    assert answered == ["a", "b", "a", "b"]

    agents.set("a", "auth")
    answered = [adapter.execute(f"later {i}").agent for i in range(4)]
    assert answered == ["b"] * 4


def test_cache_key_includes_the_answering_agent(tmp_path: Path) -> None:
    agents = Agents(tmp_path)
    config = make_config(
        tmp_path,
        agents=[agents.entry("primary", "auth"), agents.entry("backup")],
        adapter__max_retries=0,
        breaker__reset_timeout=0.5,
        breaker__storage="disk",
    )
    adapter = CachedAdapter(QChatAdapter(config))
    assert adapter.execute("same").agent == "backup"

    # primary is out: the lookup goes to backup's answer.
    hit = adapter.execute("same")
    assert hit.cached and hit.agent == "backup"

    # primary is back: its own answer is asked for, not backup's.
    agents.set("primary", "healthy")
    time.sleep(0.6)
    fresh = adapter.execute("same")
    assert not fresh.cached
    assert fresh.agent == "primary"


# -- the real CLIs -----------------------------------------------------------

REAL_CLIS = {
    "claude": "@anthropic-ai/claude-code",
    "gemini": "@google/gemini-cli",
    "codex": "@openai/codex",
}


@pytest.fixture(scope="module")
def real_clis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent CLIs from the npm registry, installed once for this module."""
    if os.environ.get("RALPH_SKIP_REAL_CLIS"):
        pytest.skip("RALPH_SKIP_REAL_CLIS is set")
    cached = os.environ.get("RALPH_REAL_CLIS_DIR")
    if cached and (Path(cached) / "node_modules" / ".bin").is_dir():
        return Path(cached) / "node_modules" / ".bin"
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")

    prefix = tmp_path_factory.mktemp("clis")
    done = subprocess.run(
        [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(prefix),
            *REAL_CLIS.values(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        pytest.skip(f"npm could not install the agent CLIs: {done.stderr[-300:]}")
    return prefix / "node_modules" / ".bin"


def run_real(
    bin_dir: Path, profile_name: str, tmp_path: Path, *, deadline: float = 8, **env: str
) -> BaseException:
    profile = PROFILES[profile_name]
    command = (str(bin_dir / profile.command[0]), *profile.command[1:])
    if profile.end_of_options:
        command = (*command, "--")
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    spec = CallSpec(
        argv=command,
        prompt_option=profile.prompt_option,
        prompt="say hello",
        deadline=time.monotonic() + deadline,
        cwd=str(tmp_path),
        env={"HOME": str(home), **env},
        limits=Limits(kill_grace=1.0),
        patterns=CompiledPatterns.of(profile),
        agent=profile_name,
    )
    try:
        run_call(spec)
    except Exception as error:
        return error
    raise AssertionError(f"{profile_name} answered without credentials")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["claude", "gemini"])
def test_real_cli_without_credentials_is_a_login_error(
    real_clis: Path, name: str, tmp_path: Path
) -> None:
    # gemini takes about 6 s to give up on a quiet machine.
    started = time.monotonic()
    error = run_real(real_clis, name, tmp_path, deadline=30)
    assert isinstance(error, QChatAuthError), repr(error)
    assert time.monotonic() - started < 30


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("claude", {"ANTHROPIC_API_KEY": "sk-ant-not-a-real-key"}),
        ("codex", {}),
    ],
)
def test_real_cli_that_hangs_without_network_ends_at_its_deadline(
    real_clis: Path, name: str, env: dict[str, str], tmp_path: Path
) -> None:
    started = time.monotonic()
    error = run_real(real_clis, name, tmp_path, **env)
    elapsed = time.monotonic() - started
    # Either it hangs and the deadline ends it, or it fails on its own:
    # never longer than the deadline and the grace.
    assert elapsed < 12
    assert isinstance(error, QChatTimeout | QChatAuthError) or error.kind == "service_error"
