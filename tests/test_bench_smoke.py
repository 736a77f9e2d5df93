"""`python -m bench --smoke` starts, runs, prints every row and writes its JSON.

A benchmark is not a test: the smoke run's figures mean nothing on a tiny
configuration and are not checked. What is checked is that the suite can
run at all, as a user runs it (a subprocess, from the project's root), that
its table names every row, and that it leaves no process behind (the
session's leak check in conftest.py sees every process it started).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The smoke run takes 10-30 s, depending on how busy the machine is.
SMOKE_TIMEOUT_S = 150


def expected_row_names() -> list[str]:
    """Every row the suite declares, read from the scenarios themselves."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.scenarios import all_row_names

    return all_row_names()


@pytest.mark.slow
@pytest.mark.timeout(SMOKE_TIMEOUT_S + 30)
def test_smoke_run_prints_every_row_and_writes_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"

    names = expected_row_names()
    missing = [name for name in names if name not in done.stdout]
    assert not missing, f"rows missing from the table: {missing}\n{done.stdout}"
    assert "targets hold" in done.stdout

    [json_path] = tmp_path.glob("results-*-smoke.json")
    payload = json.loads(json_path.read_text())
    assert [row["name"] for row in payload["rows"]] == names
    assert payload["mode"] == "smoke"
    assert payload["errors"] == []
    assert payload["leftover_processes"] == []
    assert payload["machine"]["cores"] >= 1
    assert (tmp_path / json_path.name.replace(".json", ".md")).exists()
