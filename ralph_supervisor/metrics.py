"""Metrics: the one Prometheus registry, kept in the parent.

The parent sees every outcome (workers report to it over their pipes), so one
registry there needs none of prometheus-client's multiprocess mode, with its
directory to wipe at start and its dead pids to mark.

Callers report events through methods named for them (observe_request,
breaker_transition, worker_restarted...) and never touch a prometheus
object. The series:

    qchat_requests_total{agent,outcome}          outcome: success or an error kind
    qchat_request_duration_seconds{agent}        histogram, 0.01 s .. 600 s
    qchat_active_requests                        calls in workers right now
    qchat_errors_total{agent,error_type}
    qchat_cache_hits_total, qchat_cache_misses_total
    qchat_breaker_state{agent}                   0 closed, 1 half-open, 2 open
    qchat_breaker_transitions_total{agent,to_state}
    qchat_worker_restarts_total, qchat_workers_alive
    qchat_worker_memory_bytes{worker}            resident, from the last sample
    qchat_queue_length
    qchat_ratelimit_wait_seconds_total{agent}
    qchat_retries_total{agent}
    ralph_loop_iterations_total{task,outcome}
    ralph_checkpoints_total{task}

Beside the registry, LatencyWindow keeps the last ten minutes of request
durations for latency_percentiles(): Prometheus histograms answer "since
start", the console and the loop's summary want "lately".
"""

from __future__ import annotations

import math
import random
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# From a cached answer (tens of ms) to the longest call worth waiting for.
DURATION_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

BREAKER_STATES = {"closed": 0, "half-open": 1, "half_open": 1, "open": 2}


class LatencyWindow:
    """Request durations of the last `span_s` seconds, in per-second buckets.

    Memory is bounded: at most `per_second_cap` samples are kept per second
    (a uniform reservoir sample beyond that) and buckets older than the span
    are dropped. Percentiles weight each kept sample by how many calls it
    stands for, so they stay right at any rate; below the cap they are exact.
    """

    def __init__(
        self,
        span_s: int = 600,
        *,
        per_second_cap: int = 128,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.span_s = span_s
        self.per_second_cap = per_second_cap
        self._clock = clock
        self._lock = threading.Lock()
        self._random = random.Random()
        # Each bucket: [second, calls seen, sampled durations].
        self._buckets: deque[tuple[int, list[int], array[float]]] = deque()

    def add(self, duration_s: float) -> None:
        """Record one call's duration."""
        second = int(self._clock())
        with self._lock:
            self._drop_old(second)
            if not self._buckets or self._buckets[-1][0] != second:
                self._buckets.append((second, [0], array("d")))
            _, seen, samples = self._buckets[-1]

            seen[0] += 1
            if len(samples) < self.per_second_cap:
                samples.append(duration_s)
            else:
                slot = self._random.randrange(seen[0])
                if slot < self.per_second_cap:
                    samples[slot] = duration_s

    def percentiles(self, window_s: float = 60) -> dict[str, float | int | None]:
        """Return p50, p90, p99, max (seconds) and count over the last window_s."""
        now = int(self._clock())
        oldest = now - max(1, math.ceil(min(window_s, self.span_s))) + 1
        weighted: list[tuple[float, float]] = []
        count = 0
        with self._lock:
            self._drop_old(now)
            for second, seen, samples in self._buckets:
                if second < oldest or not samples:
                    continue
                count += seen[0]
                weight = seen[0] / len(samples)
                weighted.extend((value, weight) for value in samples)

        if not weighted:
            return {"p50": None, "p90": None, "p99": None, "max": None, "count": 0}
        weighted.sort()
        return {
            "p50": _weighted_rank(weighted, 0.50),
            "p90": _weighted_rank(weighted, 0.90),
            "p99": _weighted_rank(weighted, 0.99),
            "max": weighted[-1][0],
            "count": count,
        }

    def _drop_old(self, now: int) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.span_s:
            self._buckets.popleft()


def _weighted_rank(weighted: list[tuple[float, float]], quantile: float) -> float:
    # Nearest rank: the smallest value with at least `quantile` of the
    # weight at or below it (p50 of 1..100 is 50, p99 is 99).
    total = sum(weight for _, weight in weighted)
    target = quantile * total
    running = 0.0
    for value, weight in weighted:
        running += weight
        if running >= target - 1e-9:
            return value
    return weighted[-1][0]


class Metrics:
    """The parent's metrics. Every method is safe to call from any thread."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if registry is None:
            # Our own registry, never the global one: two Metrics in one
            # process (tests, a library user) must not collide. It gets the
            # process collectors the global one would have had.
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.latency = LatencyWindow(clock=clock)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self._requests = counter(
            "qchat_requests_total", "Calls finished, by outcome", ("agent", "outcome")
        )
        self._duration = Histogram(
            "qchat_request_duration_seconds",
            "Call duration in seconds, all attempts included",
            ("agent",),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._active = gauge("qchat_active_requests", "Calls running in workers now")
        self._errors = counter(
            "qchat_errors_total", "Failed calls, by error type", ("agent", "error_type")
        )
        self._cache_hits = counter("qchat_cache_hits_total", "Calls answered from the cache")
        self._cache_misses = counter("qchat_cache_misses_total", "Cache lookups that missed")
        self._breaker_state = gauge(
            "qchat_breaker_state", "Breaker state: 0 closed, 1 half-open, 2 open", ("agent",)
        )
        self._breaker_transitions = counter(
            "qchat_breaker_transitions_total",
            "Breaker state changes, by the state entered",
            ("agent", "to_state"),
        )
        self._restarts = counter("qchat_worker_restarts_total", "Workers restarted")
        self._alive = gauge("qchat_workers_alive", "Worker processes alive")
        self._worker_memory = gauge(
            "qchat_worker_memory_bytes",
            "Resident memory of each worker and its agents, last sample",
            ("worker",),
        )
        self._queue = gauge("qchat_queue_length", "Calls waiting for a worker")
        self._ratelimit_wait = counter(
            "qchat_ratelimit_wait_seconds_total",
            "Seconds calls spent waiting for the rate limiter",
            ("agent",),
        )
        self._retries = counter("qchat_retries_total", "Attempts after the first", ("agent",))
        self._iterations = counter(
            "ralph_loop_iterations_total", "Loop iterations, by outcome", ("task", "outcome")
        )
        self._checkpoints = counter("ralph_checkpoints_total", "Checkpoints written", ("task",))

    # Calls.

    def observe_request(
        self,
        agent: str,
        outcome: str,
        duration_s: float | None,
        error_type: str | None = None,
    ) -> None:
        """Count one finished call; `outcome` is "success" or an error kind."""
        self._requests.labels(agent=agent, outcome=outcome).inc()
        if error_type is not None:
            self._errors.labels(agent=agent, error_type=error_type).inc()
        if duration_s is not None and duration_s >= 0:
            self._duration.labels(agent=agent).observe(duration_s)
            self.latency.add(duration_s)

    def set_active(self, n: int) -> None:
        self._active.set(n)

    def latency_percentiles(self, window_s: float = 60) -> dict[str, float | int | None]:
        """Return {"p50", "p90", "p99", "max", "count"} over the last window_s."""
        return self.latency.percentiles(window_s)

    # Cache.

    def cache_hit(self) -> None:
        self._cache_hits.inc()

    def cache_miss(self) -> None:
        self._cache_misses.inc()

    # Breaker.

    def breaker_state(self, agent: str, state: str) -> None:
        """Set the breaker gauge: state is closed, half-open or open."""
        self._breaker_state.labels(agent=agent).set(_breaker_value(state))

    def breaker_transition(self, agent: str, to_state: str) -> None:
        """Count a breaker state change and set the gauge to the new state."""
        value = _breaker_value(to_state)
        label = "half-open" if value == 1 else to_state
        self._breaker_transitions.labels(agent=agent, to_state=label).inc()
        self._breaker_state.labels(agent=agent).set(value)

    # Workers and queue.

    def worker_restarted(self) -> None:
        self._restarts.inc()

    def workers_alive(self, n: int) -> None:
        self._alive.set(n)

    def worker_memory(self, worker_id: object, rss_bytes: int | None) -> None:
        """Set a worker's memory sample; None removes the worker's series."""
        label = str(worker_id)
        if rss_bytes is not None:
            self._worker_memory.labels(worker=label).set(rss_bytes)
            return
        try:
            self._worker_memory.remove(label)
        except KeyError:
            pass

    def queue_length(self, n: int) -> None:
        self._queue.set(n)

    # Policy.

    def ratelimit_waited(self, agent: str, seconds: float) -> None:
        if seconds > 0:
            self._ratelimit_wait.labels(agent=agent).inc(seconds)

    def retried(self, agent: str) -> None:
        self._retries.labels(agent=agent).inc()

    # The loop.

    def loop_iteration(self, task: str, outcome: str) -> None:
        self._iterations.labels(task=task, outcome=outcome).inc()

    def checkpoint(self, task: str) -> None:
        self._checkpoints.labels(task=task).inc()

    # Exposition.

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """Return the exposition and its content type.

        The Prometheus text format (version 0.0.4, which every scraper reads)
        by default; OpenMetrics when the scraper's Accept header asks for it.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def _breaker_value(state: str) -> int:
    try:
        return BREAKER_STATES[state.lower()]
    except KeyError:
        raise ValueError(f"unknown breaker state {state!r}") from None
