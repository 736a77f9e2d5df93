"""The response cache, its keys, its files, its statistics, and single-flight."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import captured_logs, reap_forked_child

from ralph_supervisor.cache import (
    EVICTION_POLICIES,
    ResponseCache,
    SingleFlight,
    cache_key,
)

CHILD_TIMEOUT = 30.0


def cache_settings(**changes: Any) -> types.SimpleNamespace:
    values: dict[str, Any] = {
        "enabled": True,
        "dir": None,
        "ttl": 3600.0,
        "size_limit": 1 << 30,
        "eviction_policy": "least-recently-stored",
    }
    values.update(changes)
    return types.SimpleNamespace(**values)


@dataclass
class Answer:
    """Stands in for runner.Response: any picklable object will do."""

    text: str
    exit_code: int = 0


@pytest.fixture
def logs() -> Iterator[list[logging.LogRecord]]:
    with captured_logs("ralph_supervisor.cache") as records:
        yield records


def warnings_in(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------
# Keys

BASE_CALL: dict[str, Any] = {
    "prompt": "fix the tests",
    "argv": ("q", "chat", "--no-interactive"),
    "model": None,
    "cwd": None,
    "agent": "q",
}


def test_the_key_is_stable_and_changes_with_every_input(tmp_path: Path):
    key = cache_key(**BASE_CALL)
    assert key == cache_key(**BASE_CALL)
    assert len(key) == 64 and int(key, 16) >= 0

    changes = {
        "prompt": "fix the tests.",
        "argv": ("q", "chat", "--no-interactive", "--trust-all-tools"),
        "model": "claude-sonnet",
        "cwd": str(tmp_path),
        "agent": "kiro",
    }
    keys = {key}
    for name, value in changes.items():
        keys.add(cache_key(**{**BASE_CALL, name: value}))
    assert len(keys) == len(changes) + 1

    # The argv is a sequence: its order matters, its type does not.
    assert cache_key(**{**BASE_CALL, "argv": ["q", "chat", "--no-interactive"]}) == key
    assert cache_key(**{**BASE_CALL, "argv": ("chat", "q", "--no-interactive")}) != key

    # Non-ASCII prompts, even a lone surrogate, get a key.
    assert cache_key(**{**BASE_CALL, "prompt": "répare les tests ✓"}) != key
    assert cache_key(**{**BASE_CALL, "prompt": "bad \udcff"}) != key


def test_the_working_directory_is_resolved(tmp_path: Path):
    real = tmp_path / "project"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    by_real = cache_key(**{**BASE_CALL, "cwd": str(real)})
    assert cache_key(**{**BASE_CALL, "cwd": str(link)}) == by_real
    assert cache_key(**{**BASE_CALL, "cwd": str(real) + "/./"}) == by_real
    assert ResponseCache.key(**{**BASE_CALL, "cwd": str(link)}) == by_real


# ---------------------------------------------------------------------------
# Store and fetch


def test_get_put_roundtrip(tmp_path: Path):
    cache = ResponseCache(cache_settings(), tmp_path)
    key = cache_key(**BASE_CALL)
    assert cache.get(key) is None

    cache.put(key, Answer("done"))
    assert cache.get(key) == Answer("done")

    # An incomplete answer is refused; the stored one stays.
    cache.put(key, Answer("half"), complete=False)
    assert cache.get(key) == Answer("done")
    other = cache_key(**{**BASE_CALL, "prompt": "other"})
    cache.put(other, Answer("partial"), complete=False)
    assert cache.get(other) is None

    assert cache.directory == tmp_path / "cache"
    stats = cache.stats()
    assert stats["entries"] == 1
    assert stats["hits"] == 2 and stats["misses"] == 2
    assert stats["hit_ratio"] == pytest.approx(0.5)
    assert stats["size_bytes"] > 0

    assert cache.clear() == 1
    assert cache.get(key) is None
    cache.close()


def test_entries_expire_after_the_ttl(tmp_path: Path):
    cache = ResponseCache(cache_settings(ttl=0.5), tmp_path)
    cache.put("a", Answer("a"))
    cache.put("b", Answer("b"))
    assert cache.get("a") == Answer("a")

    time.sleep(0.6)
    assert cache.get("a") is None
    assert cache.stats()["entries"] == 2  # expired, not yet pruned
    assert cache.prune() == 2
    assert cache.stats()["entries"] == 0


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_size_limit_and_eviction_policies_are_accepted(tmp_path: Path, policy: str):
    # diskcache culls at most ten entries per put, oldest first by the policy,
    # once the store passes size_limit: a limit well above one entry.
    settings = cache_settings(size_limit=1_000_000, eviction_policy=policy)
    cache = ResponseCache(settings, tmp_path)
    for index in range(40):
        cache.put(f"key-{index}", Answer("x" * 40_000))
    assert cache.get("key-39") == Answer("x" * 40_000)

    entries = cache.stats()["entries"]
    if policy == "none":
        assert entries == 40
    else:
        assert entries < 40


def test_an_unknown_eviction_policy_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="eviction_policy"):
        ResponseCache(cache_settings(eviction_policy="random"), tmp_path)


def test_disabled_or_without_a_directory_it_stores_nothing(tmp_path: Path):
    off = ResponseCache(cache_settings(enabled=False), tmp_path)
    off.put("k", Answer("a"))
    assert off.get("k") is None
    assert not (tmp_path / "cache").exists()
    assert off.stats()["enabled"] is False

    nowhere = ResponseCache(cache_settings(), None)
    nowhere.put("k", Answer("a"))
    assert nowhere.get("k") is None
    assert nowhere.clear() == 0 and nowhere.prune() == 0


def test_cache_dir_setting_wins_over_the_state_dir(tmp_path: Path):
    cache = ResponseCache(cache_settings(dir=str(tmp_path / "elsewhere")), tmp_path / "state")
    cache.put("k", Answer("a"))
    assert (tmp_path / "elsewhere" / "cache.db").exists()
    assert not (tmp_path / "state").exists()


def test_files_are_private(tmp_path: Path):
    cache = ResponseCache(cache_settings(), tmp_path / "state")
    cache.put("small", Answer("a"))
    cache.put("large", Answer("x" * 200_000))  # over 32 KiB: a file of its own
    assert cache.get("large") == Answer("x" * 200_000)

    root = tmp_path / "state" / "cache"
    seen_value_file = False
    for directory, _, files in os.walk(root):
        assert os.stat(directory).st_mode & 0o777 == 0o700, directory
        for name in files:
            path = os.path.join(directory, name)
            assert os.stat(path).st_mode & 0o777 == 0o600, path
            seen_value_file |= name.endswith(".val")
    assert seen_value_file
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


# ---------------------------------------------------------------------------
# Broken directories


def test_a_corrupt_cache_degrades_to_no_caching_with_one_warning(
    tmp_path: Path, logs: list[logging.LogRecord]
):
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"this is not a database\n" * 100)

    cache = ResponseCache(cache_settings(), tmp_path)
    for _ in range(5):
        assert cache.get("k") is None
        cache.put("k", Answer("a"))
    assert cache.get("k") is None
    assert cache.clear() == 0 and cache.prune() == 0

    stats = cache.stats()
    assert stats["entries"] == 0
    assert "not a database" in stats["broken"]
    warnings = warnings_in(logs)
    assert len(warnings) == 1, warnings
    assert "response cache disabled" in warnings[0]
    assert str(directory) in warnings[0]


def test_an_unwritable_cache_dir_degrades_to_no_caching(
    tmp_path: Path, logs: list[logging.LogRecord]
):
    # Tests run as root, where chmod 0500 does not stop writes: use a path
    # below a regular file instead.
    (tmp_path / "file").write_text("")
    cache = ResponseCache(cache_settings(dir=str(tmp_path / "file" / "cache")), None)
    for _ in range(3):
        cache.put("k", Answer("a"))
        assert cache.get("k") is None
    assert cache.stats()["broken"] is not None
    assert len(warnings_in(logs)) == 1


def test_a_cache_corrupted_while_open_degrades(tmp_path: Path, logs: list[logging.LogRecord]):
    cache = ResponseCache(cache_settings(), tmp_path)
    cache.put("k", Answer("a"))
    assert cache.get("k") == Answer("a")
    cache.close()

    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        path = tmp_path / "cache" / name
        if path.exists():
            path.write_bytes(b"\xff" * 8192)
    assert cache.get("k") is None
    cache.put("k", Answer("b"))
    assert cache.get("k") is None
    assert len(warnings_in(logs)) == 1


# ---------------------------------------------------------------------------
# Processes

CHILD = textwrap.dedent(
    """
    import json, pathlib, sys, types

    from ralph_supervisor.cache import ResponseCache

    args = json.loads(sys.argv[1])
    cache = ResponseCache(types.SimpleNamespace(**args["settings"]), None)
    for index in range(3):
        cache.put(f"k{index}", {"text": f"answer {index}"})
    found = [cache.get("k0"), cache.get("k1"), cache.get("missing")]
    print(json.dumps({"found": found, "stats": cache.stats()}))
    """
)


def test_statistics_are_shared_by_processes(tmp_path: Path):
    settings = cache_settings(dir=str(tmp_path / "cache"))
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps({"settings": vars(settings)})],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0, err
    child = json.loads(out.strip().splitlines()[-1])
    assert child["found"] == [{"text": "answer 0"}, {"text": "answer 1"}, None]

    # What `ralph-supervisor cache stats` would print from another process.
    here = ResponseCache(settings, None)
    stats = here.stats()
    assert stats["entries"] == 3
    assert (stats["hits"], stats["misses"]) == (2, 1)

    assert here.get("k2") == {"text": "answer 2"}
    assert here.stats()["hits"] == 3


def test_a_forked_child_reopens_the_cache(tmp_path: Path):
    cache = ResponseCache(cache_settings(), tmp_path)
    cache.put("parent", Answer("from the parent"))

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ok = cache.get("parent") == Answer("from the parent")
            cache.put("child", Answer("from the child"))
            code = 0 if ok else 2
        finally:
            os._exit(code)

    assert reap_forked_child(pid, CHILD_TIMEOUT) == 0
    assert cache.get("child") == Answer("from the child")


# ---------------------------------------------------------------------------
# Cost of a hit


def test_hit_latency(tmp_path: Path):
    cache = ResponseCache(cache_settings(), tmp_path)
    key = cache_key(**BASE_CALL)
    cache.put(key, Answer("y" * 2000))
    assert cache.get(key) is not None

    samples = []
    for _ in range(3000):
        started = time.perf_counter()
        cache.get(key)
        samples.append(time.perf_counter() - started)
    samples.sort()
    p50 = samples[len(samples) // 2] * 1e6
    p99 = samples[int(len(samples) * 0.99)] * 1e6
    print(f"\ncache hit, 2 KB answer: p50 {p50:.1f} us, p99 {p99:.1f} us")
    assert p50 < 1000


# ---------------------------------------------------------------------------
# Single-flight


def run_together(count: int, target: Any) -> tuple[list[threading.Thread], list[Any]]:
    """Run target() in `count` threads released at once; return their outcomes."""
    barrier = threading.Barrier(count + 1)
    outcomes: list[Any] = [None] * count

    def worker(index: int) -> None:
        barrier.wait(timeout=10)
        try:
            outcomes[index] = ("ok", target())
        except BaseException as error:
            outcomes[index] = ("error", error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=10)
    return threads, outcomes


def test_single_flight_runs_once_for_twenty_threads():
    flight = SingleFlight()
    calls = []
    release = threading.Event()

    def slow_call() -> Answer:
        calls.append(threading.get_ident())
        assert release.wait(timeout=10)
        return Answer("shared")

    threads, outcomes = run_together(20, lambda: flight.run("key", slow_call))

    # Every thread is past the barrier and into run(): hold the leader a
    # moment so the last of them joins, then let it finish.
    time.sleep(0.3)
    assert len(flight) == 1
    release.set()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()

    assert len(calls) == 1
    assert all(outcome == ("ok", Answer("shared")) for outcome in outcomes)
    assert outcomes[0][1] is outcomes[-1][1]
    assert len(flight) == 0

    # The key is free again: the next call runs.
    assert flight.run("key", lambda: Answer("again")) == Answer("again")


def test_single_flight_gives_every_caller_the_same_exception():
    flight = SingleFlight()
    calls = []
    release = threading.Event()

    def failing_call() -> Answer:
        calls.append(1)
        assert release.wait(timeout=10)
        raise ValueError("the agent failed")

    threads, outcomes = run_together(20, lambda: flight.run("key", failing_call))
    time.sleep(0.3)
    release.set()
    for thread in threads:
        thread.join(timeout=10)

    assert len(calls) == 1
    errors = {id(outcome[1]) for outcome in outcomes}
    assert len(errors) == 1
    assert all(outcome[0] == "error" for outcome in outcomes)
    assert isinstance(outcomes[0][1], ValueError)
    assert len(flight) == 0


def test_join_or_lead_and_finish():
    flight = SingleFlight()
    leads, first = flight.join_or_lead("a")
    follows, second = flight.join_or_lead("a")
    assert leads and not follows and first is second
    other_leads, other = flight.join_or_lead("b")
    assert other_leads and other is not first

    flight.finish("a", result=42)
    assert second.result(timeout=0) == 42
    assert flight.join_or_lead("a")[0]
    with pytest.raises(KeyError):
        flight.finish("never-started")

    flight.finish("b", error=RuntimeError("no"))
    with pytest.raises(RuntimeError):
        other.result(timeout=0)

    # An interrupt belongs to the leader's thread; followers are cancelled.
    flight.finish("a", error=KeyboardInterrupt())
    leads, interrupted = flight.join_or_lead("c")
    flight.finish("c", error=KeyboardInterrupt())
    with pytest.raises(concurrent.futures.CancelledError):
        interrupted.result(timeout=0)
    assert len(flight) == 0
