"""state.backend redis: one breaker, one rate limit and one cache for all hosts.

Each test starts its own redis-server (tests/redis_fixture.py) and skips
when redis-server or the redis package is missing. The first tests drive the
pieces in this process; the host tests run three real QChatAdapter processes,
each with its own state directory, that stand for three hosts sharing one
Redis. They count the simulator's invocations with its count_file, start
together at one wall-clock instant, and every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_fixture import RedisServer, serve_redis

from ralph_supervisor import backend
from ralph_supervisor.breaker import Breaker
from ralph_supervisor.cache import ResponseCache
from ralph_supervisor.config import load_config
from ralph_supervisor.errors import CircuitOpen, ConfigError, QChatServiceError
from ralph_supervisor.ratelimit import RateLimiter

HOST_TIMEOUT = 30.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from serve_redis(tmp_path)


def redis_config(server: RedisServer, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "adapter.name": "sim",
        "adapter.timeout": 20,
        "adapter.max_retries": 0,
        "state.backend": "redis",
        "state.redis_url": server.url,
        "state.redis_retry_interval": 0.2,
        "breaker.fail_max": 2,
        "breaker.reset_timeout": 60,
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_config(env={}, overrides=values)


def open_host(config: Any, state_dir: Path) -> backend.SharedState:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    return backend.open_shared_state(config, state_dir)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------
# The pieces, in this process


def test_token_bucket_is_one_budget_timed_in_the_server(redis_server, tmp_path):
    from ralph_supervisor.redis_backend import RedisTokenBucket

    config = redis_config(redis_server)
    clock = FakeClock()
    buckets = [
        RedisTokenBucket(open_host(config, tmp_path / name), "q", 1.0, 3.0, clock=clock)
        for name in ("a", "b")
    ]

    # Two hosts, one bucket of three: the third token empties it for both.
    assert [buckets[i % 2].reserve() for i in range(3)] == [0.0, 0.0, 0.0]

    # Waiting callers are told times a token apart: they come back one by
    # one, not all at once for each token.
    assert buckets[0].reserve() == pytest.approx(1.0)
    assert buckets[1].reserve() == pytest.approx(2.0)
    clock.now += 1.0
    assert buckets[0].reserve() == 0.0
    clock.now += 1.0
    assert buckets[1].reserve() == 0.0

    # A caller told to wait that never came back leaves its token to others.
    assert buckets[0].reserve() == pytest.approx(1.0)
    clock.now += 5.0
    assert [buckets[1].reserve() for _ in range(3)] == [0.0, 0.0, 0.0]

    # Both hosts took tokens lately: each would keep half while Redis is away.
    assert buckets[0].hosts == 2
    assert buckets[0].share == 0.5


def test_rate_limiter_falls_back_to_a_fair_share(redis_server, tmp_path):
    config = redis_config(redis_server, limits__requests_per_minute=60, limits__burst=4)
    limiters = []
    for name in ("a", "b"):
        open_host(config, tmp_path / name)
        limiters.append(RateLimiter(config.limits, tmp_path / name, name="q"))

    # Four tokens for the two hosts together, then a wait of about a second.
    assert [limiters[i % 2].reserve() for i in range(4)] == [0.0] * 4
    assert 0.5 < limiters[0].reserve() <= 1.0
    assert limiters[0].stats()["backend"] == "redis"

    # Redis gone: host a keeps half the rate (burst 2, 30 a minute) alone.
    redis_server.stop()
    started = time.monotonic()
    assert [limiters[0].reserve() for _ in range(2)] == [0.0, 0.0]
    assert limiters[0].reserve() == pytest.approx(2.0, abs=0.1)
    assert time.monotonic() - started < 1.0


def test_breaker_is_one_circuit_with_one_trial(redis_server, tmp_path):
    config = redis_config(redis_server, breaker__reset_timeout=0.3)
    breakers = []
    for name in ("a", "b", "c"):
        open_host(config, tmp_path / name)
        breakers.append(Breaker("q", config.breaker, tmp_path / name))
    a, b, c = breakers

    for _ in range(2):
        a.record(a.admit(), QChatServiceError("down"))
    assert [x.state for x in breakers] == ["open"] * 3
    with pytest.raises(CircuitOpen):
        b.admit()

    time.sleep(0.35)
    trial = c.admit(lease_seconds=0.3)
    assert trial.trial
    for other in (a, b):
        with pytest.raises(CircuitOpen, match="trial call is in progress"):
            other.admit()

    # Host c dies mid-trial: its lease runs out and another host takes over.
    time.sleep(0.35)
    takeover = b.admit(lease_seconds=5)
    assert takeover.trial
    b.record(takeover, None)
    assert [x.state for x in breakers] == ["closed"] * 3
    assert a.snapshot()["storage"] == "redis"
    assert a.snapshot()["transitions"] == 3  # open, half-open, closed


def test_cache_is_shared_and_a_call_in_flight_is_joined(redis_server, tmp_path):
    config = redis_config(redis_server)
    caches = []
    for name in ("a", "b"):
        open_host(config, tmp_path / name)
        caches.append(ResponseCache(config.cache, tmp_path / name))
    a, b = caches

    # a misses and so leads the call; b waits for a's answer, not the agent.
    assert a.get("k") is None
    threading.Timer(0.3, a.put, args=("k", {"answer": 42})).start()
    started = time.monotonic()
    assert b.get("k") == {"answer": 42}
    assert 0.25 < time.monotonic() - started < 1.5

    stats = b.stats()
    assert stats["backend"] == "redis"
    assert (stats["entries"], stats["hits"], stats["misses"], stats["joined"]) == (1, 1, 1, 1)
    ttl = redis_server.client().pttl("ralph:cache:v:k")
    assert 0 < ttl <= config.cache.ttl * 1000

    # A call abandoned (it failed) frees the flight at once.
    assert a.get("other") is None
    a.abandon("other")
    assert b.get("other") is None


def test_slow_redis_degrades_within_the_timeout_and_recovers(redis_server, tmp_path, caplog):
    config = redis_config(redis_server, limits__requests_per_minute=600, state__redis_timeout=0.2)
    shared = open_host(config, tmp_path / "a")
    changes: list[tuple[bool, str | None]] = []
    shared.on_change = lambda degraded, reason: changes.append((degraded, reason))
    limiter = RateLimiter(config.limits, tmp_path / "a", name="q")
    cache = ResponseCache(config.cache, tmp_path / "a")
    breaker = Breaker("q", config.breaker, tmp_path / "a")
    assert shared.health() == (True, None)

    # The server stops answering anyone for 1.5 s.
    redis_server.client().execute_command("CLIENT", "PAUSE", 1500, "ALL")
    caplog.set_level(logging.INFO, logger="ralph_supervisor")
    started = time.monotonic()
    for _ in range(20):
        assert limiter.reserve() >= 0.0
        assert cache.get("anything") is None
        breaker.record(breaker.admit(), None)
    assert time.monotonic() - started < 1.0, "a slow Redis must cost one timeout, once"

    ok, reason = shared.health()
    assert not ok and reason is not None
    assert reason.startswith("degraded: shared state unavailable")
    assert "Timeout" in reason
    assert breaker.snapshot()["storage"] == "disk"
    warnings = [r for r in caplog.records if "shared state unavailable" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING

    deadline = time.monotonic() + 5
    while not shared.health()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shared.health() == (True, None)
    assert breaker.snapshot()["storage"] == "redis"
    assert [degraded for degraded, _ in changes] == [True, False]


def test_password_file_and_refused_password(redis_server, tmp_path):
    redis_server.client().config_set("requirepass", "s3cret")
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")

    good = redis_config(redis_server, state__redis_password_file=str(secret))
    assert open_host(good, tmp_path / "a").health() == (True, None)

    # No password: the host starts degraded and says why, but works.
    bad = open_host(redis_config(redis_server), tmp_path / "b")
    ok, reason = bad.health()
    assert not ok and "Authentication" in str(reason)

    missing = redis_config(redis_server, state__redis_password_file=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="redis_password_file"):
        open_host(missing, tmp_path / "c")


def test_redis_settings_are_checked():
    with pytest.raises(ConfigError, match="redis://, rediss:// or unix://"):
        load_config(env={}, overrides={"state.redis_url": "localhost:6379"})

    config = load_config(
        env={}, overrides={"state.redis_url": "rediss://h:6380/0", "state.redis_tls": True}
    )
    assert config.state.redis_timeout == 0.3
    assert config.state.redis_prefix == "ralph"


def test_local_backend_changes_nothing(tmp_path):
    config = load_config(env={}, overrides={"state.dir": str(tmp_path)})
    shared = backend.open_shared_state(config, tmp_path)
    try:
        assert shared.backend == "local"
        assert shared.health() == (True, None)
        limiter = RateLimiter(
            types.SimpleNamespace(requests_per_minute=60, burst=1), tmp_path, name="q"
        )
        assert limiter.reserve() == 0.0
        assert limiter.stats()["backend"] == "local"
        assert Breaker("q", config.breaker, tmp_path).snapshot()["storage"] == "disk"
    finally:
        backend.close_shared_state(tmp_path)


# ---------------------------------------------------------------------------
# Three hosts: real processes, one Redis

HOST = textwrap.dedent(
    """
    import json, sys, time
    from ralph_supervisor.adapter import CachedAdapter, QChatAdapter
    from ralph_supervisor.config import load_config

    config = load_config(env={}, overrides=json.loads(sys.argv[1]))
    adapter = QChatAdapter(config, state_dir=sys.argv[2])
    cached = CachedAdapter(adapter)

    def call(command):
        target = cached if command.get("cached") else adapter
        try:
            response = target.execute(command["prompt"])
        except Exception as error:
            return {"ok": False, "error": type(error).__name__, "message": str(error)}
        return {"ok": True, "cached": response.cached}

    def health():
        ok, reason = adapter.guard.shared.health()
        return {"ok": ok, "reason": reason, "breaker": adapter.guard.breaker.state}

    for line in sys.stdin:
        command = json.loads(line)
        time.sleep(max(0.0, command.get("at", 0) - time.time()))
        if command["op"] == "call":
            answer = call(command)
        elif command["op"] == "loop":
            answer = {"results": []}
            while time.time() < command["until"]:
                answer["results"].append(call(command))
        else:
            answer = health()
        print(json.dumps(answer), flush=True)
    """
)


class Host:
    """One host: a QChatAdapter process that answers one JSON line per command."""

    def __init__(self, name: str, config: dict[str, Any], tmp_path: Path, count: Path) -> None:
        self.name = name
        state_dir = tmp_path / f"host-{name}"
        state_dir.mkdir(mode=0o700)
        env = dict(os.environ, QCHAT_SIM_COUNT_FILE=str(count), QCHAT_SIM_PROFILE="instant")
        self.stderr = open(tmp_path / f"host-{name}.err", "w+b")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOST, json.dumps(config), str(state_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def send(self, op: str, **fields: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()

    def answer(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.lines.get(timeout=HOST_TIMEOUT)))
        except queue.Empty:
            self.stop()
            self.stderr.seek(0)
            log = self.stderr.read().decode(errors="replace")[-3000:]
            pytest.fail(f"host {self.name} did not answer in {HOST_TIMEOUT} s:\n{log}")

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return self.answer()

    def stop(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.stderr.close()


@pytest.fixture
def hosts(redis_server, tmp_path) -> Iterator[Any]:
    started: list[Host] = []
    count = tmp_path / "calls.log"

    def start(**overrides: Any) -> list[Host]:
        config: dict[str, Any] = {
            "adapter.name": "sim",
            "adapter.timeout": 20,
            "adapter.max_retries": 0,
            "breaker.storage": "disk",
            "state.backend": "redis",
            "state.redis_url": redis_server.url,
            "state.redis_retry_interval": 0.2,
        }
        config.update({key.replace("__", "."): value for key, value in overrides.items()})
        for name in ("a", "b", "c"):
            started.append(Host(name, config, tmp_path, count))
        # Each host answers once it is up: connected, or degraded.
        assert all(host.ask("health")["ok"] for host in started)
        return started

    def calls() -> int:
        """Agent processes started so far, by every host."""
        return len(count.read_text().splitlines()) if count.exists() else 0

    def call_times() -> list[float]:
        """When each agent process started (the count file's second column)."""
        lines = count.read_text().splitlines() if count.exists() else []
        return sorted(float(line.split("\t")[1]) for line in lines)

    start.calls = calls  # type: ignore[attr-defined]
    start.call_times = call_times  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for host in started:
            host.stop()


def all_at(hosts: list[Host], op: str, delay: float = 0.3, **fields: Any) -> list[dict]:
    """Send one command to every host, to start at the same instant."""
    at = time.time() + delay
    for host in hosts:
        host.send(op, at=at, **fields)
    return [host.answer() for host in hosts]


def test_hosts_share_one_breaker_and_send_one_trial(hosts):
    a, b, c = hosts(breaker__fail_max=2, breaker__reset_timeout=1.5)

    for _ in range(2):
        assert a.ask("call", prompt="@sim:failure=service down")["error"] == "QChatServiceError"
    assert hosts.calls() == 2

    # Tripped by a: open for b and c too, and no agent process started.
    for host in (b, c):
        refused = host.ask("call", prompt="hello")
        assert refused["error"] == "CircuitOpen", refused
        assert host.ask("health")["breaker"] == "open"
    assert hosts.calls() == 2

    # Reset due: the three hosts ask at once; one trial runs, the others wait.
    time.sleep(1.5)
    answers = all_at([a, b, c], "call", prompt="@sim:latency=0.8 trial")
    assert sorted(answer["ok"] for answer in answers) == [False, False, True], answers
    refused = [answer for answer in answers if not answer["ok"]]
    assert all(answer["error"] == "CircuitOpen" for answer in refused), refused
    assert all("trial in progress" in answer["message"] for answer in refused), refused
    assert hosts.calls() == 3

    assert [host.ask("call", prompt="after")["ok"] for host in (a, b, c)] == [True] * 3
    assert hosts.calls() == 6


def test_hosts_share_one_rate_limit(hosts):
    burst, seconds = 2, 5.0
    group = hosts(limits__requests_per_minute=60, limits__burst=burst)

    until = time.time() + 0.3 + seconds
    answers = all_at(group, "loop", prompt="tick", until=until)
    results = [result for answer in answers for result in answer["results"]]
    assert all(result["ok"] for result in results)

    # 60 a minute for the three together: the burst, then one a second.
    # Three separate limits would have allowed three times as many.
    starts = hosts.call_times()
    span = starts[-1] - starts[0]
    assert span >= seconds - 1
    assert span - 1 <= len(starts) <= burst + span + 1, (len(starts), span)


def test_hosts_share_the_cache_and_calls_in_flight(hosts):
    a, b, c = hosts()

    assert a.ask("call", prompt="what is 2+2", cached=True) == {"ok": True, "cached": False}
    assert b.ask("call", prompt="what is 2+2", cached=True) == {"ok": True, "cached": True}
    assert c.ask("call", prompt="what is 2+2", cached=True) == {"ok": True, "cached": True}
    assert hosts.calls() == 1

    # The same slow question on three hosts at once: asked once.
    answers = all_at([a, b, c], "call", prompt="@sim:latency=1 slow", cached=True)
    assert all(answer["ok"] for answer in answers)
    assert sorted(answer["cached"] for answer in answers) == [False, True, True]
    assert hosts.calls() == 2


def test_losing_redis_degrades_without_a_failed_call(hosts, redis_server):
    a, b, c = hosts(limits__requests_per_minute=6000)
    assert a.ask("call", prompt="before", cached=True)["cached"] is False
    assert b.ask("call", prompt="before", cached=True)["cached"] is True

    redis_server.stop()
    until = time.time() + 0.3 + 1.5
    answers = all_at([a, b, c], "loop", prompt="during", cached=True, until=until)
    results = [result for answer in answers for result in answer["results"]]
    assert results and all(result["ok"] for result in results), results
    for host in (a, b, c):
        health = host.ask("health")
        assert not health["ok"]
        assert health["reason"].startswith("degraded: shared state unavailable")

    # Redis back on the same port: the hosts find it and share again.
    redis_server.start()
    deadline = time.monotonic() + 10
    while not all(host.ask("health")["ok"] for host in (a, b, c)):
        assert time.monotonic() < deadline, "the hosts did not reconnect"
        time.sleep(0.1)
    calls_before = hosts.calls()
    assert a.ask("call", prompt="after", cached=True)["cached"] is False
    assert b.ask("call", prompt="after", cached=True)["cached"] is True
    assert c.ask("call", prompt="after", cached=True)["cached"] is True
    assert hosts.calls() == calls_before + 1
