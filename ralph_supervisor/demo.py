"""`ralph-supervisor demo`: the quick start, on the built-in simulator.

It copies the example task (a four-item checklist, PROMPT.md) into a
scratch directory and runs `start` there with the simulator as the agent,
which ticks one item per iteration and says LOOP_COMPLETE when none is
left: a whole Ralph loop, with workers, checkpoints and the health server,
that finishes by itself in a few seconds and needs no real `q`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

EXAMPLE = "PROMPT.md"


def add_demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a small Ralph loop on the simulator in a scratch directory",
        description=(
            "Copy the example task into a scratch directory (a git repository, "
            "so checkpoints commit) and run `start --agent sim` there."
        ),
    )
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="where to put the example task (default: a new temporary directory)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.3,
        help="the simulated agent's seconds per answer",
    )
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from ralph_supervisor.cli import main

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ralph-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    prompt = workdir / EXAMPLE
    if not prompt.exists():
        with resources.as_file(resources.files("ralph_supervisor.examples") / EXAMPLE) as source:
            shutil.copyfile(source, prompt)
    _init_git(workdir)

    # The simulator reads its knobs from the environment the workers pass on.
    os.environ.setdefault("QCHAT_SIM_LATENCY", str(args.latency))

    print(f"demo: the example task is in {workdir}; the simulator plays the agent")
    code = main(
        [
            "start",
            "--agent",
            "sim",
            "--workdir",
            str(workdir),
            "--health-port",
            "0",
            "--checkpoint-interval",
            "1",
            "--log-level",
            "INFO",
        ]
    )
    print(f"demo: exit status {code}; see {workdir / EXAMPLE} and {workdir / '.ralph'}")
    return code


def _init_git(workdir: Path) -> None:
    if shutil.which("git") is None or (workdir / ".git").exists():
        return
    subprocess.run(
        ["git", "init", "-q", str(workdir)],
        check=False,
        capture_output=True,
        timeout=30,
    )
