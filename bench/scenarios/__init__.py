"""The scenarios, in the order the table shows them.

Each module has GROUP (its heading in the table), ROWS (the names of the
rows it always reports, measured or not) and run(bench) -> list[Row].
"""

from __future__ import annotations

from types import ModuleType

from bench.scenarios import (
    availability,
    deployment,
    fast_paths,
    idle,
    large_answer,
    overhead,
    recovery,
    throughput,
)

SCENARIOS: tuple[ModuleType, ...] = (
    deployment,
    availability,
    overhead,
    throughput,
    large_answer,
    fast_paths,
    recovery,
    idle,
)


def all_row_names() -> list[str]:
    return [name for scenario in SCENARIOS for name in scenario.ROWS]
