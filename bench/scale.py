"""Scale-out: many supervisors, one account's quota, one Redis (state.backend redis).

    run_scale(quick) -> dict        python -m bench.scale [--quick]

Two steps:

1. Calibrate on a real, private redis-server (a free loopback port): the
   round trip (p50, p99) and the server CPU of each operation the backend
   uses (the token-bucket EVALSHA, the cache lookup script, GET, SET PX,
   HGET), and the round trips and server CPU of one real library call
   (CachedAdapter on the simulator: a miss, a hit, an uncached call).
2. Model: a discrete-event simulation of N supervisors with W callers each,
   running agent calls back to back (a Ralph loop never idles) against one
   account's quota. Three ways to share: redis (one bucket, one breaker),
   local (what each host does alone today: every bucket holds the whole
   quota) and degraded (Redis away: each host keeps 1/N). It counts call
   starts against the quota, trial calls per breaker reset while the service
   is down, and Redis operations per call, the herd of waiting callers
   included. From the calibration: Redis CPU, and the latency added to a call.

The token bucket and the breaker in the model follow redis_backend exactly:
reserve() takes a token or says how long until one is due, and a caller
sleeps that long and asks again; a refused caller waits for retry_at.
Without redis-server (or the redis package) the model runs on assumed
figures, and the result says so.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Used when no redis-server can be measured: loopback figures of the
# development container (2 CPUs), rounded up.
ASSUMED = {
    "rtt_ms": {"evalsha_token_bucket": 0.15, "get": 0.1, "set_px": 0.1, "hget": 0.1},
    "cpu_us": {"evalsha_token_bucket": 20.0, "get": 8.0, "set_px": 10.0, "hget": 8.0},
    "per_call": {
        "miss": {"round_trips": 7.0},
        "hit": {"round_trips": 2.0},
        "uncached": {"round_trips": 4.0},
    },
}

# A LAN round trip, added to the loopback one for a deployment across hosts.
LAN_RTT_MS = 0.5

# One Redis process is one core. Leave half of it for bursts and failover.
REDIS_HEADROOM = 0.5


# ---------------------------------------------------------------------------
# Calibration


@contextlib.contextmanager
def private_redis() -> Iterator[int]:
    """A redis-server on a free loopback port, stopped on exit."""
    import redis

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", directory]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        client.close()
        yield port
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


def server_cpu_us(client: Any) -> float:
    info = client.info("cpu")
    return (float(info["used_cpu_user"]) + float(info["used_cpu_sys"])) * 1e6


def measure_op(client: Any, operation: Callable[[], Any], count: int) -> dict[str, float]:
    """Round trip p50 and p99 (ms), and server CPU per operation (µs)."""
    for _ in range(min(100, count)):
        operation()
    samples = []
    cpu_before = server_cpu_us(client)
    for _ in range(count):
        started = time.perf_counter()
        operation()
        samples.append((time.perf_counter() - started) * 1000)
    cpu = (server_cpu_us(client) - cpu_before) / count
    samples.sort()
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "cpu_us": cpu,
    }


def calibrate(quick: bool) -> dict[str, Any]:
    """Measure the backend's operations and one library call on a real Redis."""
    if shutil.which("redis-server") is None:
        return {"calibrated": False, "why": "redis-server is not installed", **ASSUMED}
    try:
        import redis  # noqa: F401
    except ImportError:
        return {"calibrated": False, "why": "the redis package is not installed", **ASSUMED}

    count = 2000 if quick else 10000
    with private_redis() as port, tempfile.TemporaryDirectory() as state:
        return {"calibrated": True, **_calibrate_on(port, Path(state), count, quick)}


def _calibrate_on(port: int, state: Path, count: int, quick: bool) -> dict[str, Any]:
    import pickle

    import redis

    from ralph_supervisor import backend
    from ralph_supervisor.config import load_config
    from ralph_supervisor.redis_backend import RedisResponseStore, RedisTokenBucket
    from ralph_supervisor.runner import Response

    config = load_config(
        env={},
        overrides={
            "adapter.name": "sim",
            "state.dir": str(state),
            "state.backend": "redis",
            "state.redis_url": f"redis://127.0.0.1:{port}/0",
            "limits.requests_per_minute": 1e6,
            "limits.burst": 10000,
            "breaker.storage": "disk",
        },
    )
    shared = backend.open_shared_state(config, state)
    client = redis.Redis(port=port)
    try:
        bucket = RedisTokenBucket(shared, "bench", 1e9, 1e9)  # type: ignore[arg-type]
        store = RedisResponseStore(shared, 3600)  # type: ignore[arg-type]
        answer = Response("x" * 2000, "", 0, 1.0, agent="q")
        store.put("hit", answer)
        blob = pickle.dumps(answer)
        ops = {
            "evalsha_token_bucket": bucket.reserve,
            "cache_lookup_script": lambda: store.get("hit"),
            "get": lambda: client.get("ralph:cache:v:hit"),
            "set_px": lambda: client.set("bench:value", blob, px=60000),
            "hget": lambda: client.hget("ralph:breaker:q", "state"),
        }
        measured = {name: measure_op(client, op, count) for name, op in ops.items()}
        per_call = _measure_calls(config, state, shared, 5 if quick else 20)
        version = str(client.info("server")["redis_version"])
        names = [entry.get("name", "") for entry in client.client_list()]
        connections = sum(1 for name in names if name.startswith("ralph-supervisor"))
    finally:
        client.close()
        backend.close_shared_state(state)

    return {
        "redis_version": version,
        "connections_per_process": connections,
        "ops": measured,
        "rtt_ms": {name: m["p50_ms"] for name, m in measured.items()},
        "cpu_us": {name: m["cpu_us"] for name, m in measured.items()},
        "per_call": per_call,
    }


def _measure_calls(
    config: Any, state: Path, shared: Any, count: int
) -> dict[str, dict[str, float]]:
    """Round trips and server CPU of one call through the library, per path."""
    from ralph_supervisor.adapter import CachedAdapter, QChatAdapter

    os.environ["QCHAT_SIM_PROFILE"] = "instant"
    adapter = QChatAdapter(config, state_dir=state)
    cached = CachedAdapter(adapter)
    cached.execute("warm up")

    def run(calls: Callable[[int], Any]) -> dict[str, float]:
        # Round trips, counted by the client. (Server CPU over a call would
        # mostly be Redis's own background work while the agent runs: the
        # model takes CPU per operation, measured in a tight loop, instead.)
        trips = shared.stats()["round_trips"]
        for index in range(count):
            calls(index)
        return {"round_trips": (shared.stats()["round_trips"] - trips) / count}

    return {
        "miss": run(lambda i: cached.execute(f"question {i}")),
        "hit": run(lambda i: cached.execute(f"question {i}")),
        "uncached": run(lambda i: adapter.execute(f"question {i}")),
    }


# ---------------------------------------------------------------------------
# The model


@dataclass
class Bucket:
    """redis_backend's token bucket: refill, then take or say how long.

    staggered: callers told to wait are told times one token apart, as the
    Lua script does; without it (the state directory's bucket) every waiting
    caller is told the time the next token is due.
    """

    rate: float
    capacity: float
    staggered: bool = True
    tokens: float | None = None  # None: never used, so full
    last: float = 0.0
    next_free: float = 0.0

    def reserve(self, now: float) -> float:
        tokens = self.capacity if self.tokens is None else self.tokens
        tokens = min(self.capacity, tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if tokens >= 1 - 1e-9:
            self.tokens = max(0.0, tokens - 1)
            return 0.0
        self.tokens = tokens
        due = now + (1 - tokens) / self.rate
        if not self.staggered:
            return due - now
        slot = max(due, self.next_free)
        self.next_free = slot + 1 / self.rate
        return slot - now


@dataclass
class Circuit:
    """The breaker: fail_max failures open it; one trial lease when due."""

    fail_max: int
    reset_timeout: float
    state: str = "closed"
    failures: int = 0
    opened_at: float = 0.0
    trial_held: bool = False
    epoch: int = 0  # outcomes of calls admitted before the last opening do not count

    def admit(self, now: float) -> tuple[str, float | None]:
        """("call" | "trial" | "refused", when to ask again)."""
        if self.state == "closed":
            return "call", None
        if self.trial_held:
            return "refused", None
        due = self.opened_at + self.reset_timeout
        if self.state == "open" and now < due:
            return "refused", due
        self.state, self.trial_held = "half-open", True
        return "trial", None

    def release(self, kind: str) -> None:
        if kind == "trial":
            self.trial_held = False

    def record(self, now: float, kind: str, epoch: int, failed: bool) -> None:
        if kind == "trial":
            self.trial_held = False
            if failed:
                self.state, self.opened_at = "open", now
                self.epoch += 1
            else:
                self.state, self.failures = "closed", 0
            return
        if epoch != self.epoch or self.state != "closed":
            return
        if not failed:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.fail_max:
            self.state, self.opened_at = "open", now
            self.epoch += 1


@dataclass
class Model:
    hosts: int
    callers: int  # per host: threads of a QChatAdapter, or busy workers
    quota_per_min: float
    burst: int
    sharing: str  # redis, local, degraded
    duration: float
    call_median: float = 30.0
    call_sigma: float = 0.6
    outage: tuple[float, float] | None = None
    fail_latency: float = 1.0
    fail_max: int = 5
    reset_timeout: float = 30.0
    staggered: bool = True
    seed: int = 7


def simulate(model: Model) -> dict[str, Any]:
    """Run the model; counts of starts, trials, failures and Redis round trips."""
    rng = random.Random(model.seed)
    rate = model.quota_per_min / 60.0
    per_host = model.sharing != "redis"
    share = 1.0 / model.hosts if model.sharing == "degraded" else 1.0
    groups = model.hosts if per_host else 1
    # The state directory's bucket (local, degraded) does not stagger.
    staggered = model.staggered and model.sharing == "redis"
    buckets = [
        Bucket(rate * share, max(1.0, model.burst * share), staggered) for _ in range(groups)
    ]
    circuits = [Circuit(model.fail_max, model.reset_timeout) for _ in range(groups)]

    starts: list[float] = []
    counts = {"reserve": 0, "admit": 0, "trials": 0, "failed": 0, "calls": 0}
    mu = math.log(model.call_median)
    events: list[tuple[float, int, int, str, Any]] = []
    sequence = 0

    def at(when: float, caller: int, what: str, data: Any = None) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (when, sequence, caller, what, data))

    def down(now: float) -> bool:
        return model.outage is not None and model.outage[0] <= now < model.outage[1]

    # Callers start spread over the first second, as hosts never start at once.
    for caller in range(model.hosts * model.callers):
        at(rng.random(), caller, "ask")

    while events:
        now, _, caller, what, data = heapq.heappop(events)
        if now >= model.duration:
            break
        group = caller // model.callers if per_host else 0
        circuit = circuits[group]

        # As Supervisor._start_attempt: admit, then a token; without one,
        # hand the ticket back and ask both again when the token is due.
        if what == "ask":
            counts["admit"] += 1
            kind, again = circuit.admit(now)
            if kind == "refused":
                wait = (again - now) if again is not None else 1.0
                at(now + wait + rng.random(), caller, "ask")
                continue
            counts["reserve"] += 1
            wait = buckets[group].reserve(now)
            if wait > 0:
                circuit.release(kind)
                at(now + wait, caller, "ask")
                continue
            epoch = circuit.epoch
            starts.append(now)
            counts["calls"] += 1
            counts["trials"] += kind == "trial"
            failed = down(now)
            took = model.fail_latency if failed else rng.lognormvariate(mu, model.call_sigma)
            at(now + took, caller, "done", (kind, epoch, failed))

        else:
            kind, epoch, failed = data
            counts["failed"] += failed
            circuit.record(now, kind, epoch, failed)
            at(now, caller, "ask")

    return {"starts": starts, "counts": counts}


def run_model(model: Model, calibration: dict[str, Any]) -> dict[str, Any]:
    result = simulate(model)
    starts, counts = result["starts"], result["counts"]
    peak, first = 0, 0
    for last, when in enumerate(starts):
        while when - starts[first] >= 60.0:
            first += 1
        peak = max(peak, last - first + 1)
    calls = max(1, counts["calls"])
    minutes = model.duration / 60.0

    # Each ask is one breaker read (HGET); each token ask one EVALSHA. The
    # rest of a call (recording its outcome) is the measured uncached call
    # less those two, breaker reads all.
    fixed_trips = max(0.0, calibration["per_call"]["uncached"]["round_trips"] - 2)
    cpu = calibration["cpu_us"]
    trips = counts["admit"] + counts["reserve"] + fixed_trips * counts["calls"]
    cpu_us = (
        counts["reserve"] * cpu["evalsha_token_bucket"]
        + (counts["admit"] + fixed_trips * counts["calls"]) * cpu["hget"]
    )
    allowed = model.quota_per_min * minutes + model.burst
    report: dict[str, Any] = {
        "sharing": model.sharing,
        "hosts": model.hosts,
        "callers_per_host": model.callers,
        "calls": counts["calls"],
        "calls_per_min": counts["calls"] / minutes,
        "quota_per_min": model.quota_per_min,
        "rate_vs_quota": counts["calls"] / minutes / model.quota_per_min,
        "calls_over_quota": max(0, round(counts["calls"] - allowed)),
        "peak_calls_in_a_minute": peak,
        "token_asks_per_call": counts["reserve"] / calls,
    }
    if model.sharing == "redis":
        rtt = calibration["rtt_ms"]["evalsha_token_bucket"]
        report.update(
            redis_round_trips_per_call=trips / calls,
            redis_ops_per_s=trips / model.duration,
            redis_cpu_share=cpu_us / 1e6 / model.duration,
            added_latency_ms_loopback=(fixed_trips + 2) * rtt,
            added_latency_ms_lan=(fixed_trips + 2) * (rtt + LAN_RTT_MS),
        )
    if model.outage is not None:
        length = model.outage[1] - model.outage[0]
        periods = max(1.0, length / model.reset_timeout)
        report.update(
            failed_calls=counts["failed"],
            trial_calls=counts["trials"],
            trial_calls_per_reset=counts["trials"] / periods,
        )
    return report


# ---------------------------------------------------------------------------
# The scenario


def run_scale(quick: bool) -> dict[str, Any]:
    """Calibrate, model, and return figures and table rows (see the module doc)."""
    calibration = calibrate(quick)
    hosts = 50 if quick else 100
    callers = 5
    quota, burst = 300.0, 10
    duration = 180.0 if quick else 600.0
    outage = (30.0, 150.0) if quick else (60.0, 300.0)

    steady = {
        sharing: run_model(Model(hosts, callers, quota, burst, sharing, duration), calibration)
        for sharing in ("redis", "local", "degraded")
    }
    # The same, had every waiting caller been told the same time (the herd).
    herd = run_model(
        Model(hosts, callers, quota, burst, "redis", duration, staggered=False), calibration
    )
    sick = {
        sharing: run_model(
            Model(hosts, callers, quota, burst, sharing, duration, outage=outage), calibration
        )
        for sharing in ("redis", "local")
    }

    # Redis load against the number of supervisors: with staggered waits it
    # follows the quota, not the crowd waiting for it.
    sweep = {
        count: run_model(Model(count, callers, quota, burst, "redis", duration / 2), calibration)[
            "redis_ops_per_s"
        ]
        for count in ((10, hosts) if quick else (10, hosts, 3 * hosts))
    }

    # How far one Redis serves. Calls are bounded by the quota, so the CPU a
    # call costs bounds the quota one Redis can meter; hits take no quota and
    # cost a breaker read and the lookup script; every process holds a
    # connection per thread using Redis at once (maxclients: 10000).
    redis = steady["redis"]
    cpu = calibration["cpu_us"]
    cpu_per_call = redis["redis_cpu_share"] * duration * 1e6 / max(1.0, redis["calls"])
    cpu_per_hit = cpu["hget"] + cpu["cache_lookup_script"]
    capacity = {
        "redis_ops_per_s_by_supervisors": sweep,
        "server_cpu_us_per_call": cpu_per_call,
        "max_quota_calls_per_min_at_half_a_core": REDIS_HEADROOM * 1e6 / cpu_per_call * 60,
        "max_cache_hits_per_s_at_half_a_core": REDIS_HEADROOM * 1e6 / cpu_per_hit,
        "connections_per_process": calibration.get("connections_per_process", 1),
        "max_supervisors_by_maxclients_at_one_connection_a_caller": 10000 // max(1, callers),
    }

    rows = _rows(calibration, steady, herd, sick, capacity, hosts)
    return {
        "calibration": calibration,
        "steady": steady,
        "unstaggered": herd,
        "outage": sick,
        "capacity": capacity,
        "rows": rows,
    }


ROW_ROUND_TRIP = "redis token bucket: round trip"
ROW_RATE = "many supervisors, one quota: call rate vs quota"
ROW_TRIALS = "breaker: trial calls per reset, all hosts"
ROW_TRIPS = "redis round trips per call"
ROW_CAPACITY = "quota one redis meters (calls/min)"
ROW_NAMES = (ROW_ROUND_TRIP, ROW_RATE, ROW_TRIALS, ROW_TRIPS, ROW_CAPACITY)


def _row(name: str, measured: str, value: float, goal: tuple[str, float] | None) -> dict[str, Any]:
    """A table row: `goal` is (op, limit), judged as `value op limit`."""
    holds = None
    if goal is not None:
        op, limit = goal
        holds = {"<": value < limit, "<=": value <= limit}[op]
    return {
        "name": name,
        "measured": measured,
        "value": value,
        "target": None if goal is None else f"{goal[0]} {goal[1]:g}",
        "op": None if goal is None else goal[0],
        "limit": None if goal is None else goal[1],
        "holds": holds,
    }


def _rows(
    calibration: dict[str, Any],
    steady: dict[str, Any],
    herd: dict[str, Any],
    sick: dict[str, Any],
    capacity: dict[str, Any],
    hosts: int,
) -> list[dict[str, Any]]:
    """Rows for the bench table, named by ROW_NAMES, in that order."""
    source = "measured" if calibration["calibrated"] else "ASSUMED: no redis-server"
    token = calibration.get("ops", {}).get("evalsha_token_bucket", {})
    redis, local, degraded = steady["redis"], steady["local"], steady["degraded"]
    rtt = calibration["rtt_ms"]["evalsha_token_bucket"]

    return [
        _row(
            ROW_ROUND_TRIP,
            f"p50 {rtt:.3f} ms, p99 {token.get('p99_ms', float('nan')):.3f} ms, "
            f"{calibration['cpu_us']['evalsha_token_bucket']:.0f} µs of server CPU ({source})",
            rtt,
            ("<", 1.0),
        ),
        _row(
            ROW_RATE,
            f"{hosts} supervisors: {redis['calls_per_min']:.0f}/min for a quota of "
            f"{redis['quota_per_min']:.0f} (x{redis['rate_vs_quota']:.2f}); each host "
            f"alone: x{local['rate_vs_quota']:.2f}; redis away: x{degraded['rate_vs_quota']:.2f}",
            redis["rate_vs_quota"],
            ("<=", 1.05),
        ),
        _row(
            ROW_TRIALS,
            f"{sick['redis']['trial_calls_per_reset']:.1f} for {hosts} hosts (each alone: "
            f"{sick['local']['trial_calls_per_reset']:.0f}); calls that reached the sick "
            f"service: {sick['redis']['failed_calls']} (alone: {sick['local']['failed_calls']})",
            sick["redis"]["trial_calls_per_reset"],
            ("<=", 1.0),
        ),
        _row(
            ROW_TRIPS,
            f"{redis['redis_round_trips_per_call']:.1f} with {hosts} supervisors waiting "
            f"(token asks {redis['token_asks_per_call']:.1f}; "
            f"{herd['token_asks_per_call']:.0f} if waits were not staggered); "
            f"a cache hit {calibration['per_call']['hit']['round_trips']:.0f}, "
            f"a miss {calibration['per_call']['miss']['round_trips']:.0f}",
            redis["redis_round_trips_per_call"],
            ("<", 10.0),
        ),
        _row(
            ROW_CAPACITY,
            f"{capacity['max_quota_calls_per_min_at_half_a_core']:.0f} at half a core "
            f"({capacity['server_cpu_us_per_call']:.0f} µs a call); "
            f"{capacity['max_cache_hits_per_s_at_half_a_core']:.0f} hits/s; "
            f"{hosts} supervisors cost {redis['redis_ops_per_s']:.0f} ops/s",
            capacity["max_quota_calls_per_min_at_half_a_core"],
            None,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    result = run_scale(quick="--quick" in args)
    result.pop("rows")
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
