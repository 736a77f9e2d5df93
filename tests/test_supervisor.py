"""The supervisor with real worker processes and the simulator as the agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import psutil
import pytest
from conftest import SESSION_TAG, make_config, wait_until

from ralph_supervisor.errors import (
    PromptRejected,
    QChatProcessError,
    QChatTimeout,
    QueueFull,
    SupervisorClosed,
)
from ralph_supervisor.supervisor import Supervisor


def live_agents() -> list[psutil.Process]:
    agents = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            if "ralph_supervisor.simulator" not in cmdline:
                continue
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get("RALPH_TEST_SESSION") == SESSION_TAG:
                agents.append(process)
        except psutil.Error:
            continue
    return agents


def busy_worker(supervisor: Supervisor) -> dict:
    assert wait_until(
        lambda: any(
            w["state"] == "busy" and w["agent_pgid"] for w in supervisor.stats()["workers"]
        )
    )
    return next(w for w in supervisor.stats()["workers"] if w["state"] == "busy")


def test_calls_complete_and_stats_add_up(tmp_path: Path) -> None:
    config = make_config(tmp_path, performance__max_concurrent=3)
    with Supervisor(config) as supervisor:
        futures = [supervisor.submit(f"task {i}") for i in range(12)]
        done, not_done = wait(futures, timeout=60)
        assert not not_done
        assert all(f.result().text for f in futures)

        stats = supervisor.stats()
        assert stats["completed"] == 12
        assert stats["failed"] == 0
        assert stats["workers_alive"] == 3
        assert sum(w["requests"] for w in stats["workers"]) == 12
        assert stats["breaker_state"] == "closed"


def test_sigkill_mid_call_still_completes_and_slot_is_refilled(tmp_path: Path) -> None:
    config = make_config(tmp_path, performance__max_concurrent=2)
    with Supervisor(config) as supervisor:
        future = supervisor.submit("long job @sim:latency=1.5")
        victim = busy_worker(supervisor)
        agent_pgid = victim["agent_pgid"]

        os.kill(victim["pid"], signal.SIGKILL)
        response = future.result(timeout=30)

        assert response.attempts == 2
        stats = supervisor.stats()
        assert stats["worker_restarts"] == 1
        assert wait_until(lambda: supervisor.stats()["workers_alive"] == 2)
        new_pids = {w["pid"] for w in supervisor.stats()["workers"]}
        assert victim["pid"] not in new_pids
        # The first attempt's agent died with its worker: never two at once.
        assert not psutil.pid_exists(agent_pgid) or psutil.Process(agent_pgid).status() == "zombie"


def test_a_call_that_kills_every_worker_ends_in_worker_lost(tmp_path: Path) -> None:
    config = make_config(tmp_path, performance__max_concurrent=1, adapter__max_retries=1)
    with Supervisor(config) as supervisor:
        future = supervisor.submit("doomed @sim:latency=5")
        for _ in range(2):
            victim = busy_worker(supervisor)
            os.kill(victim["pid"], signal.SIGKILL)
            assert wait_until(
                lambda v=victim: all(w["pid"] != v["pid"] for w in supervisor.stats()["workers"])
            )
        error = future.exception(timeout=30)
        assert type(error).__name__ == "WorkerLost"
        assert error.attempts == 2


def test_crash_loop_backs_off_then_hits_the_intensity_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        tmp_path,
        performance__max_concurrent=1,
        supervisor__max_restarts=4,
        supervisor__restart_period=60,
        supervisor__restart_backoff=0.1,
    )
    with Supervisor(config) as supervisor:
        spawn_times = []
        for _ in range(5):
            assert wait_until(lambda: supervisor.stats()["workers"][0]["state"] == "idle", 30)
            spawn_times.append(time.monotonic())
            victim = supervisor.stats()["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda v=victim: supervisor.stats()["workers"][0]["pid"] != v, 10)

        gaps = [b - a for a, b in zip(spawn_times, spawn_times[1:], strict=False)]
        # 0, 0.1, 0.2, 0.4 s of backoff: later gaps are longer than the first.
        assert gaps[3] > gaps[0] + 0.25

        # The fifth restart within the period passes max_restarts: the slot
        # waits for the window to clear instead of spinning.
        assert supervisor.intensity_exceeded
        time.sleep(1.0)
        assert supervisor.stats()["workers"][0]["state"] == "dead"
        assert supervisor.stats()["intensity_exceeded"]
        assert any("max_restarts" in r.getMessage() for r in caplog.records)


def test_two_hundred_calls_from_twenty_threads_never_exceed_the_pool(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, performance__max_concurrent=5, cache__enabled=False, adapter__timeout=120
    )
    peak = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, len(live_agents()))

    sampler = threading.Thread(target=sample, daemon=True)
    results: list = []
    lock = threading.Lock()

    with Supervisor(config) as supervisor:

        def submitter(thread: int) -> None:
            # The deadline counts from submit, queueing included: on a
            # loaded 2-core machine 200 queued calls may take a while.
            futures = [
                supervisor.submit(f"thread {thread} call {i} @sim:latency=0.05") for i in range(10)
            ]
            with lock:
                results.extend(futures)

        sampler.start()
        threads = [threading.Thread(target=submitter, args=(t,)) for t in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

        done, not_done = wait(results, timeout=120)
        sampling.set()
        sampler.join(10)

        assert len(results) == 200
        assert not not_done
        errors = [repr(f.exception()) for f in results if f.exception() is not None]
        assert not errors, errors[:3]
        assert supervisor.stats()["completed"] == 200

    assert 1 <= peak <= 5


def test_queue_full_is_backpressure(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, performance__max_concurrent=1, supervisor__queue_size=2, cache__enabled=False
    )
    with Supervisor(config) as supervisor:
        first = supervisor.submit("one @sim:latency=1")
        second = supervisor.submit("two @sim:latency=0.1")
        with pytest.raises(QueueFull):
            supervisor.submit("three")
        assert first.result(30).text and second.result(30).text
        # Room again once the queue drained.
        assert supervisor.execute("four").text


def test_submit_after_close_is_refused(tmp_path: Path) -> None:
    supervisor = Supervisor(make_config(tmp_path, performance__max_concurrent=1))
    supervisor.start()
    supervisor.close()
    with pytest.raises(SupervisorClosed):
        supervisor.submit("too late")


def test_rejected_prompt_fails_its_future_without_a_process(tmp_path: Path) -> None:
    with Supervisor(make_config(tmp_path, performance__max_concurrent=1)) as supervisor:
        future = supervisor.submit("   ")
        assert isinstance(future.exception(timeout=1), PromptRejected)
        assert supervisor.stats()["workers"][0]["requests"] == 0


def test_non_retryable_failure_is_not_retried(tmp_path: Path) -> None:
    config = make_config(tmp_path, performance__max_concurrent=1, adapter__max_retries=3)
    with Supervisor(config) as supervisor:
        error = supervisor.submit("login please @sim:failure=auth").exception(timeout=30)
        assert type(error).__name__ == "QChatAuthError"
        assert error.attempts == 1


def test_retryable_failure_is_retried_up_to_max_retries(tmp_path: Path) -> None:
    config = make_config(tmp_path, performance__max_concurrent=1, adapter__max_retries=2)
    with Supervisor(config) as supervisor:
        error = supervisor.submit("crash @sim:exit=1").exception(timeout=30)
        assert isinstance(error, QChatProcessError)
        assert error.attempts == 3
        assert "after 3 attempts" in str(error)


def test_stopped_worker_is_killed_as_hung_past_the_deadline(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        performance__max_concurrent=1,
        adapter__kill_grace=0.2,
        supervisor__hang_grace=0.5,
    )
    with Supervisor(config) as supervisor:
        future = supervisor.submit("slow @sim:latency=3", timeout=1.0)
        victim = busy_worker(supervisor)
        # A stopped worker cannot enforce its own deadline: the parent must.
        os.kill(victim["pid"], signal.SIGSTOP)
        error = future.exception(timeout=30)
        assert isinstance(error, QChatTimeout)
        assert wait_until(lambda: supervisor.stats()["workers"][0]["pid"] != victim["pid"])


def test_workers_are_recycled_after_max_requests(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        performance__max_concurrent=1,
        supervisor__max_requests_per_worker=3,
        cache__enabled=False,
    )
    with Supervisor(config) as supervisor:
        pids = set()
        for i in range(10):
            supervisor.execute(f"call {i} @sim:latency=0")
            pids.add(supervisor.stats()["workers"][0]["pid"])
        assert wait_until(lambda: supervisor.stats()["workers"][0]["state"] == "idle")
        pids.add(supervisor.stats()["workers"][0]["pid"])
        assert len(pids) >= 3
        assert supervisor.stats()["worker_restarts"] == 0


@pytest.mark.usefixtures("restore_signals")
def test_sighup_resizes_the_pool(tmp_path: Path) -> None:
    config = make_config(tmp_path, performance__max_concurrent=2)
    sizes = iter([4, 1])

    def reload() -> object:
        return config.with_overrides({"performance.max_concurrent": next(sizes)})

    with Supervisor(config, reload_config=reload) as supervisor:
        supervisor.install_signal_handlers()
        in_flight = supervisor.submit("keep going @sim:latency=1")

        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_until(lambda: supervisor.stats()["workers_alive"] == 4, 20)

        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_until(lambda: len(supervisor.stats()["workers"]) == 1, 20)
        assert in_flight.result(timeout=30).text
        assert supervisor.execute("after shrinking").text


OWNER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import make_config
    from ralph_supervisor.supervisor import Supervisor

    def main():
        import logging
        logging.basicConfig(level=logging.INFO)
        config = make_config(Path({tmp!r}), performance__max_concurrent=4,
                             cache__enabled=False, supervisor__drain_timeout=20)
        supervisor = Supervisor(config)
        supervisor.start()
        supervisor.install_signal_handlers()
        futures = [supervisor.submit(f"job {{i}} @sim:latency={latency}") for i in range({count})]
        print("ready", flush=True)
        supervisor.stop_requested.wait(60)
        supervisor.close()
        outcomes = {{}}
        for future in futures:
            error = future.exception(timeout=5)
            key = "ok" if error is None else type(error).__name__
            outcomes[key] = outcomes.get(key, 0) + 1
        print(json.dumps(outcomes), flush=True)

    if __name__ == "__main__":
        main()
    """
)


def start_owner(tmp_path: Path, count: int, latency: float = 0.5) -> subprocess.Popen[str]:
    script = tmp_path / "owner.py"
    tests = str(Path(__file__).parent)
    script.write_text(
        OWNER_SCRIPT.format(tests=tests, tmp=str(tmp_path), count=count, latency=latency)
    )
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def test_sigterm_under_load_drains_then_exits_zero(tmp_path: Path) -> None:
    process = start_owner(tmp_path, count=20)
    try:
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        outcomes = json.loads(stdout.strip().splitlines()[-1])
        # Calls in flight finished; the queued ones were refused, none hang.
        assert sum(outcomes.values()) == 20
        assert outcomes.get("ok", 0) >= 4
        assert set(outcomes) <= {"ok", "SupervisorClosed"}
        assert "draining" in stderr
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    process = start_owner(tmp_path, count=8)
    try:
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_workers_and_agents_die_with_a_killed_parent(tmp_path: Path) -> None:
    process = start_owner(tmp_path, count=4, latency=30)
    try:
        assert wait_until(lambda: len(live_agents()) >= 1, 10)
        process.kill()
        process.wait(10)
        # The autouse leak check waits a few seconds and fails on survivors;
        # check here too, to fail with a clear message.
        assert wait_until(lambda: not live_agents(), 10), "agents outlived their supervisor"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.mark.usefixtures("restore_signals")
def test_sigusr1_writes_a_diagnostic_dump(tmp_path: Path) -> None:
    config = make_config(tmp_path, performance__max_concurrent=1)
    with Supervisor(config) as supervisor:
        supervisor.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wait_until(lambda: supervisor.last_dump is not None, 20)
        assert supervisor.last_dump is not None
        text = supervisor.last_dump.read_text()
        assert "ralph-supervisor-loop" in text
        assert str(supervisor.stats()["workers"][0]["pid"]) in text


def test_sigterm_to_the_whole_group_still_drains(tmp_path: Path) -> None:
    # supervisord's stopasgroup and a terminal signal the whole group: the
    # workers must leave the stopping to the supervisor, not die mid-call.
    process = start_owner(tmp_path, count=4, latency=1.0)
    try:
        assert wait_until(lambda: len(live_agents()) >= 1, 10)
        os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        outcomes = json.loads(stdout.strip().splitlines()[-1])
        assert outcomes.get("ok", 0) >= 1
        assert "WorkerLost" not in outcomes
        assert "died" not in stderr
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_operator_restart_of_one_worker_costs_no_call(tmp_path: Path) -> None:
    config = make_config(tmp_path, performance__max_concurrent=1)
    with Supervisor(config) as supervisor:
        future = supervisor.submit("in flight @sim:latency=0.8")
        victim = busy_worker(supervisor)
        assert supervisor.restart_worker(0)
        assert not supervisor.restart_worker(5)

        assert future.result(timeout=30).attempts == 1
        assert wait_until(lambda: supervisor.stats()["workers"][0]["pid"] != victim["pid"], 10)
        assert wait_until(lambda: supervisor.stats()["workers"][0]["state"] == "idle", 10)
        assert supervisor.stats()["worker_restarts"] == 0
