"""`ralph-supervisor cache stats | clear | prune` against a real cache."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ralph_supervisor.adapter import CachedAdapter, QChatAdapter
from ralph_supervisor.config import load_config


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ralph_supervisor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_cache_stats_clear_prune(tmp_path: Path) -> None:
    config = load_config(env={}, overrides={"adapter.name": "sim", "cache.ttl": 0.5})
    adapter = CachedAdapter(QChatAdapter(config, workdir=str(tmp_path)))
    adapter.execute("first @sim:latency=0")
    adapter.execute("first @sim:latency=0")
    adapter.execute("second @sim:latency=0")

    stats = cli("cache", "stats", "--workdir", str(tmp_path))
    assert stats.returncode == 0, stats.stderr
    assert "entries    2" in stats.stdout
    assert "hits       1" in stats.stdout
    assert "misses     2" in stats.stdout
    assert "hit ratio  33.3%" in stats.stdout

    time.sleep(0.6)
    pruned = cli("cache", "prune", "--workdir", str(tmp_path))
    assert pruned.returncode == 0
    assert "removed 2 expired entries" in pruned.stdout

    adapter.execute("third @sim:latency=0")
    cleared = cli("cache", "clear", "--workdir", str(tmp_path))
    assert "removed 1 entries" in cleared.stdout
    assert "entries    0" in cli("cache", "stats", "--workdir", str(tmp_path)).stdout


def test_cache_stats_without_a_cache_says_so(tmp_path: Path) -> None:
    done = cli("cache", "stats", "--workdir", str(tmp_path))
    assert done.returncode == 1
    assert "no cache at" in done.stderr
    assert "Traceback" not in done.stderr
