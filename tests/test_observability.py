"""Health, metrics and logs of a running `start`, over real HTTP."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import wait_until
from test_start import Runner, checklist

from ralph_supervisor.health import assess


def health_url(workdir: Path) -> str:
    path = workdir / ".ralph" / "health.json"
    assert wait_until(lambda: path.exists() and "url" in path.read_text(), 20)
    return str(json.loads(path.read_text())["url"])


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = answer.read()
            status = answer.status
            content_type = answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        body = error.read()
        status = error.code
        content_type = error.headers.get("Content-Type", "")
    if "json" in content_type:
        return status, json.loads(body)
    return status, body.decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        labelled = all(f'{key}="{want}"' in series for key, want in labels.items())
        if labelled and series.split("{")[0] == name:
            return float(value)
    return 0.0


def test_healthy_then_metrics_move_and_logs_are_json(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(30))
    log_file = runner.tmp_path / "ralph.log"
    process = runner.start(
        workdir,
        "--config",
        str(runner.config()),
        "--log-file",
        str(log_file),
        env={"QCHAT_SIM_LATENCY": "0.2"},
    )
    url = health_url(workdir)

    assert wait_until(lambda: get(url + "/health")[0] == 200, 20)
    status, body = get(url + "/health")
    assert body["status"] == "healthy"
    assert body["adapter"] == "sim"
    assert body["version"]

    status, detailed = get(url + "/health/detailed")
    assert {"cpu_percent", "memory_percent", "disk_usage"} <= set(detailed["system"])
    assert detailed["workers"] and detailed["agents"][0]["name"] == "sim"

    _, first = get(url + "/metrics")
    assert wait_until(
        lambda: (
            metric(get(url + "/metrics")[1], "qchat_requests_total", outcome="success")
            >= metric(first, "qchat_requests_total", outcome="success") + 2
        ),
        30,
    )
    _, text = get(url + "/metrics")
    assert metric(text, "qchat_workers_alive") == 2
    assert metric(text, "qchat_request_duration_seconds_count") >= 2
    assert metric(text, "ralph_loop_iterations_total", outcome="success") >= 1

    assert get(url + "/nowhere")[0] == 404
    process.send_signal(signal.SIGTERM)
    assert runner.finish(process, 30).returncode == 0

    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    iterations = [r for r in records if "iteration" in r and "duration_s" in r]
    assert iterations and all("attempts" in r for r in iterations)


def test_breaker_open_gives_503_and_errors_are_labelled(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(3))
    config = runner.config("loop:\n  max_consecutive_failures: 100\n  max_open_wait: 600\n")
    config.write_text(
        config.read_text().replace("breaker:\n", "breaker:\n  fail_max: 2\n  reset_timeout: 60\n")
    )
    process = runner.start(
        workdir,
        "--config",
        str(config),
        env={"QCHAT_SIM_FAILURE": "throttled", "QCHAT_SIM_LATENCY": "0.05"},
    )
    url = health_url(workdir)

    def breaker_open() -> bool:
        status, body = get(url + "/health")
        return status == 503 and "breaker open" in " ".join(body.get("reasons", []))

    assert wait_until(breaker_open, 30)
    status, body = get(url + "/health")
    assert body["status"] == "unhealthy"
    assert any("breaker open: agent sim" in reason for reason in body["reasons"]), body

    _, text = get(url + "/metrics")
    assert metric(text, "qchat_errors_total", error_type="throttled") >= 2
    assert metric(text, "qchat_breaker_state", agent="sim") == 2

    process.send_signal(signal.SIGTERM)
    assert runner.finish(process, 30).returncode == 0


def test_draining_answers_503(runner: Runner) -> None:
    workdir = runner.workdir(prompt=checklist(3))
    process = runner.start(
        workdir,
        "--config",
        str(runner.config()),
        env={"QCHAT_SIM_LATENCY": "3"},
    )
    url = health_url(workdir)
    assert wait_until(lambda: get(url + "/health")[0] == 200, 20)
    time.sleep(0.5)  # an iteration is in flight

    process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: "draining" in str(get(url + "/health")[1]), 10)
    _, body = get(url + "/health")
    assert any("draining" in reason for reason in body["reasons"])
    assert runner.finish(process, 30).returncode == 0


def stats(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "closing": False,
        "workers_alive": 2,
        "intensity_exceeded": False,
        "agents": [{"name": "q", "breaker": {"state": "closed"}}],
    }
    return base | overrides


def test_assess_names_each_reason() -> None:
    assert assess(stats()) == ("healthy", [])

    login = {"state": "open", "last_error_kind": "auth_error", "retry_at": 160.0}
    backup = {"name": "kiro", "breaker": {"state": "closed"}}
    status, reasons = assess(stats(agents=[{"name": "q", "breaker": login}, backup]), now=100)
    assert status == "degraded"
    assert reasons == ["login required: agent q is not logged in (its breaker is open)"]

    status, reasons = assess(
        stats(agents=[{"name": "q", "breaker": {"state": "open", "retry_at": 160.0}}]), now=100
    )
    assert status == "unhealthy"
    assert reasons == ["breaker open: agent q, next trial in 60 s"]

    assert assess(stats(workers_alive=0))[0] == "unhealthy"
    assert assess(stats(intensity_exceeded=True))[1][0].startswith("restart intensity")
    shared = {"ok": False, "reason": "redis unreachable"}
    assert assess(stats(shared_state=shared)) == (
        "degraded",
        ["degraded: shared state unavailable (redis unreachable)"],
    )
