"""The agents the benchmarks call, and the configurations that call them.

Two agents stand in for q:

- the simulator (`python -m ralph_supervisor.simulator chat ...`), with its
  latency profiles: what a user's calls look like, start-up cost included;
- zero_agent, a few lines of C compiled here at run time: it answers "ok"
  at once (or after `@sim:latency=S`, or with `@sim:stdout_bytes=N` of
  filler), so that what a caller adds to a call is not buried under the
  40-60 ms an interpreter takes to start.

Every caller, supervised or not, runs the same argv with the prompt as the
last word and /dev/null as stdin.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralph_supervisor.config import load_config

ZERO_AGENT_SOURCE = Path(__file__).with_name("zero_agent.c")

SIM_ARGV = (
    sys.executable,
    "-m",
    "ralph_supervisor.simulator",
    "chat",
    "--no-interactive",
    "--trust-all-tools",
)


@dataclass(frozen=True)
class Agent:
    """A command line that answers a prompt given as its last word."""

    name: str
    argv: tuple[str, ...]

    def command(self, prompt: str) -> list[str]:
        return [*self.argv, prompt]


SIMULATOR = Agent("simulator", SIM_ARGV)


def build_zero_agent(work_dir: Path) -> tuple[Agent | None, str]:
    """Compile zero_agent.c with `cc` into work_dir; (None, why) when impossible."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "no C compiler (cc, gcc, clang) on PATH: zero-latency rows skipped"

    binary = work_dir / "zero_agent"
    try:
        subprocess.run(
            [compiler, "-O2", "-o", str(binary), str(ZERO_AGENT_SOURCE)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except subprocess.CalledProcessError as error:
        return None, f"{compiler} failed: {error.stderr.strip()[:200]}"
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"{compiler} failed: {error}"
    return Agent("zero_agent (C)", (str(binary), "chat")), f"compiled with {compiler}"


def bench_config(state_dir: Path, agent: Agent, **overrides: Any) -> Any:
    """A configuration that runs `agent`, with its state in `state_dir`.

    Defaults stay defaults (disk breaker, cache on, 4096-byte reads) unless
    a scenario says otherwise: the figures are for the configuration users
    get. Keys are dotted, with `__` for the dot: performance__max_concurrent.
    """
    values: dict[str, Any] = {
        "adapter.name": "sim",
        "adapter.command": list(agent.argv),
        "state.dir": str(state_dir),
        "logging.level": "WARNING",
        "monitoring.health_check_enabled": False,
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_config(env={}, overrides=values)


def fresh_dir(parent: Path, name: str) -> Path:
    """A new directory under parent (mode 0700), for one supervisor's state."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
