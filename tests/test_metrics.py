"""Metrics: each event moves its series; the rolling latency window."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ralph_supervisor.metrics import LatencyWindow, Metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return _samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_observe_request_counts_outcome_duration_and_errors():
    metrics = Metrics()
    metrics.observe_request("q", "success", 0.3)
    metrics.observe_request("q", "success", 1.7)
    metrics.observe_request("q", "timeout", 120.0, error_type="timeout")

    assert _value(metrics, "qchat_requests_total", agent="q", outcome="success") == 2
    assert _value(metrics, "qchat_requests_total", agent="q", outcome="timeout") == 1
    assert _value(metrics, "qchat_errors_total", agent="q", error_type="timeout") == 1
    assert _value(metrics, "qchat_request_duration_seconds_count", agent="q") == 3
    assert _value(metrics, "qchat_request_duration_seconds_sum", agent="q") == pytest.approx(122.0)
    bucket = "qchat_request_duration_seconds_bucket"
    assert _value(metrics, bucket, agent="q", le="0.5") == 1
    assert _value(metrics, bucket, agent="q", le="0.01") == 0
    assert _value(metrics, bucket, agent="q", le="600.0") == 3


def test_gauges_follow_their_last_value():
    metrics = Metrics()
    metrics.set_active(3)
    metrics.workers_alive(5)
    metrics.queue_length(17)
    metrics.set_active(2)

    assert _value(metrics, "qchat_active_requests") == 2
    assert _value(metrics, "qchat_workers_alive") == 5
    assert _value(metrics, "qchat_queue_length") == 17


def test_cache_and_worker_counters():
    metrics = Metrics()
    metrics.cache_hit()
    metrics.cache_hit()
    metrics.cache_miss()
    metrics.worker_restarted()

    assert _value(metrics, "qchat_cache_hits_total") == 2
    assert _value(metrics, "qchat_cache_misses_total") == 1
    assert _value(metrics, "qchat_worker_restarts_total") == 1


def test_breaker_state_and_transitions():
    metrics = Metrics()
    metrics.breaker_state("q", "closed")
    assert _value(metrics, "qchat_breaker_state", agent="q") == 0

    metrics.breaker_transition("q", "open")
    assert _value(metrics, "qchat_breaker_state", agent="q") == 2
    metrics.breaker_transition("q", "half_open")
    assert _value(metrics, "qchat_breaker_state", agent="q") == 1
    metrics.breaker_transition("q", "open")

    transitions = "qchat_breaker_transitions_total"
    assert _value(metrics, transitions, agent="q", to_state="open") == 2
    assert _value(metrics, transitions, agent="q", to_state="half-open") == 1
    with pytest.raises(ValueError, match="unknown breaker state"):
        metrics.breaker_state("q", "ajar")


def test_worker_memory_is_removed_for_a_dead_worker():
    metrics = Metrics()
    metrics.worker_memory(1, 50_000_000)
    metrics.worker_memory(2, 70_000_000)
    metrics.worker_memory(1, 60_000_000)
    assert _value(metrics, "qchat_worker_memory_bytes", worker="1") == 60_000_000

    metrics.worker_memory(1, None)
    metrics.worker_memory(1, None)
    assert _value(metrics, "qchat_worker_memory_bytes", worker="1") is None
    assert _value(metrics, "qchat_worker_memory_bytes", worker="2") == 70_000_000


def test_policy_and_loop_counters():
    metrics = Metrics()
    metrics.ratelimit_waited("q", 1.5)
    metrics.ratelimit_waited("q", 0.0)
    metrics.ratelimit_waited("q", 2.0)
    metrics.retried("q")
    metrics.loop_iteration("docs", "success")
    metrics.loop_iteration("docs", "success")
    metrics.loop_iteration("docs", "throttled")
    metrics.checkpoint("docs")

    assert _value(metrics, "qchat_ratelimit_wait_seconds_total", agent="q") == 3.5
    assert _value(metrics, "qchat_retries_total", agent="q") == 1
    iterations = "ralph_loop_iterations_total"
    assert _value(metrics, iterations, task="docs", outcome="success") == 2
    assert _value(metrics, iterations, task="docs", outcome="throttled") == 1
    assert _value(metrics, "ralph_checkpoints_total", task="docs") == 1


def test_render_offers_openmetrics_when_asked():
    metrics = Metrics()
    metrics.cache_hit()
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_two_instances_do_not_collide():
    first, second = Metrics(), Metrics()
    first.cache_hit()
    assert _value(second, "qchat_cache_hits_total") == 0
    assert _value(first, "process_resident_memory_bytes") is not None


def test_percentiles_are_exact_below_the_cap():
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    for value in range(1, 101):
        metrics.observe_request("q", "success", value / 100)

    result = metrics.latency_percentiles()
    assert result["count"] == 100
    assert result["p50"] == 0.50
    assert result["p90"] == 0.90
    assert result["p99"] == 0.99
    assert result["max"] == 1.0


def test_percentiles_only_see_their_window():
    clock = FakeClock()
    window = LatencyWindow(span_s=600, clock=clock)
    window.add(9.0)
    clock.now += 120
    for _ in range(10):
        window.add(0.2)

    assert window.percentiles(60)["count"] == 10
    assert window.percentiles(60)["max"] == 0.2
    assert window.percentiles(300)["count"] == 11
    assert window.percentiles(300)["max"] == 9.0

    clock.now += 601
    assert window.percentiles(600) == {
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
        "count": 0,
    }


def test_percentiles_weight_a_sampled_second():
    clock = FakeClock()
    window = LatencyWindow(span_s=600, per_second_cap=16, clock=clock)
    # One busy second of fast calls, then one quiet second of slow calls.
    # The busy second keeps 16 samples; unweighted, the 20 slow calls would
    # be the majority and p50 would be 5.0.
    for _ in range(1000):
        window.add(0.1)
    clock.now += 1
    for _ in range(20):
        window.add(5.0)

    result = window.percentiles(60)
    assert result["count"] == 1020
    assert result["p50"] == 0.1
    assert result["p99"] == 5.0


def test_window_memory_is_bounded():
    clock = FakeClock()
    window = LatencyWindow(span_s=600, per_second_cap=8, clock=clock)
    for second in range(2000):
        clock.now = 1000.0 + second
        for _ in range(20):
            window.add(0.5)

    assert len(window._buckets) == 600
    assert all(len(samples) <= 8 for _, _, samples in window._buckets)
    assert window.percentiles(600)["count"] == 600 * 20
