"""The PNG: latency distributions and throughput over time (matplotlib).

    [deployment latency CDF] [zero-latency call time CDF] [completions per second]

matplotlib is the `bench` extra; without it the table and the JSON are
still written, and the PNG is skipped with a message saying how to get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

NO_MATPLOTLIB = (
    "matplotlib is not installed, so no PNG was written "
    "(pip install -e '.[bench]' to get it); the table and the JSON are complete"
)


def write_plot(path: Path, series: dict[str, Any], title: str) -> str | None:
    """Write the figure to `path`; return why not when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return NO_MATPLOTLIB

    figure, (latency, calls, rate) = plt.subplots(1, 3, figsize=(18, 5.2))
    figure.suptitle(title, fontsize=10)

    for name, colour, target in (("simple", "tab:blue", 0.5), ("complex", "tab:orange", 2.0)):
        values = series.get(f"latency_{name}", [])
        if values:
            draw_cdf(latency, [v * 1e3 for v in values], f"{name} ({len(values)} calls)", colour)
            latency.axvline(target * 1e3, color=colour, linestyle=":", linewidth=1)
    latency.set_title("deployment: call latency (submit to result)")
    latency.set_xlabel("ms (dotted: the p50 / p99 targets)")
    latency.set_ylabel("fraction of calls")
    show_legend(latency)

    for name, values in series.get("zero_agent_calls", {}).items():
        draw_cdf(calls, [v * 1e3 for v in values], name, None)
    calls.set_xscale("log")
    calls.set_title("one call to zero_agent, by caller")
    calls.set_xlabel("ms (log scale)")
    show_legend(calls)

    for key, label in (
        ("completions_simple", "simple, 10 at once"),
        ("completions_complex", "complex, 20 at once"),
        ("completions_faults", "simple with faults, 10 at once"),
    ):
        draw_rate(rate, series.get(key, []), label)
    rate.set_title("throughput over time (first run of each)")
    rate.set_xlabel("seconds since the run started")
    rate.set_ylabel("calls answered per second")
    show_legend(rate)

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def draw_cdf(axes: Any, values: Sequence[float], label: str, colour: str | None) -> None:
    ordered = sorted(values)
    fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
    axes.step(ordered, fractions, where="post", label=label, color=colour)


def draw_rate(axes: Any, ended: Sequence[float], label: str) -> None:
    """Calls answered in each whole second since the start."""
    if not ended:
        return
    seconds = int(max(ended)) + 1
    counts = [0] * seconds
    for moment in ended:
        counts[int(moment)] += 1
    axes.plot(range(seconds), counts, label=label, drawstyle="steps-post")


def show_legend(axes: Any) -> None:
    """A legend, when something was drawn (a smoke run may draw nothing)."""
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize=8)
