"""What the benchmark ran on: cores, CPU model, Python, load, versions.

Figures from a 2-core shared machine and a 32-core idle one are different
facts; every result file carries this description beside its numbers.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def source_revision(tree: Path) -> str | None:
    """The commit checked out in `tree`, and whether files differ from it.

    Read-only git commands: the benchmark never touches the index or HEAD.
    """
    try:
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{' with local changes' if changed else ''}"


def autogroup() -> bool | None:
    """Whether the scheduler shares CPU between sessions before processes.

    The runner starts every agent in a session of its own; with autogroup
    on, each such agent gets a session's share of a busy machine, while the
    agents of a plain subprocess.run share the caller's one.
    """
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def describe_machine() -> dict[str, Any]:
    """The facts a reader needs to compare these figures with others."""
    import ralph_supervisor

    package_dir = Path(ralph_supervisor.__file__).resolve().parent
    memory = psutil.virtual_memory()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "memory_total_mb": round(memory.total / 2**20),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "sched_autogroup": autogroup(),
        "start_method": "forkserver (the supervisor's own choice)",
        "default_start_method": multiprocessing.get_start_method(allow_none=True),
        # The simulator is a Python program: without bytecode files every
        # call compiles it again, which costs CPU on every simulated call.
        "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "ralph_supervisor_version": getattr(ralph_supervisor, "__version__", None),
        "source_revision": source_revision(package_dir.parent),
    }


def one_line(machine: dict[str, Any]) -> str:
    """The machine in a line, for the head of the table."""
    return (
        f"{machine['cores']} cores, {machine['cpu_model']}, "
        f"Python {machine['python']}, {machine['platform']}, "
        f"load at start {'/'.join(str(x) for x in machine['load_average_at_start'])}"
    )
