"""The README stays true: its configuration reference is the schema's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ralph_supervisor.cli import COMMANDS
from ralph_supervisor.config import schema_rows

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_configuration_reference_is_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "readme_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_every_key_and_variable_is_in_the_readme() -> None:
    for row in schema_rows():
        assert f"`{row.key}`" in README
        if row.env:
            assert f"`{row.env}`" in README


def test_every_command_is_in_the_readme() -> None:
    for name, _ in COMMANDS:
        assert f"ralph-supervisor {name}" in README


def test_readme_names_no_unknown_qchat_variable() -> None:
    known = {row.env for row in schema_rows() if row.env}
    named = set(re.findall(r"\bQCHAT_[A-Z_]+\b", README))
    # QCHAT_SIM_* belong to the simulator (docs/simulator.md).
    named = {name for name in named if not name.startswith("QCHAT_SIM_")}
    assert named <= known, named - known


def test_the_commands_table_names_only_real_commands() -> None:
    table = README.split("## The commands", 1)[1].split("### start", 1)[0]
    listed = set(re.findall(r"\| `ralph-supervisor (\w+)", table))
    assert listed == {name for name, _ in COMMANDS}


def test_quick_start_demo_runs_the_loop_to_completion(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ralph_supervisor", "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "QCHAT_SIM_LATENCY": "0.05"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\n- [ ]" not in (tmp_path / "PROMPT.md").read_text()
    assert "demo: exit status 0" in done.stdout
