"""Retries, the breaker, the rate limit and the cache, end to end on the simulator."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import make_config, wait_until

from ralph_supervisor.adapter import CachedAdapter, QChatAdapter
from ralph_supervisor.errors import (
    CircuitOpen,
    PromptRejected,
    QChatProcessError,
    QChatThrottled,
)
from ralph_supervisor.policy import backoff_delay
from ralph_supervisor.supervisor import Supervisor

FLAKY_AGENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    counter = Path(sys.argv[1])
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls < int(sys.argv[2]):
        print("transient failure", file=sys.stderr)
        sys.exit(1)
    print(f"answer on call {calls}")
    """
)


def flaky_command(tmp_path: Path, succeed_on: int) -> list[str]:
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY_AGENT)
    return [sys.executable, str(script), str(tmp_path / "calls"), str(succeed_on)]


def invocations(count_file: Path) -> int:
    return len(count_file.read_text().splitlines()) if count_file.exists() else 0


def test_backoff_is_exponential_with_full_jitter() -> None:
    import random

    rng = random.Random(7)
    for attempt in range(1, 8):
        cap = min(60.0, 1.0 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 1.0, 60.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # it spreads over the whole range
    assert backoff_delay(30, 1.0, 60.0) <= 60.0


def test_adapter_succeeds_on_the_third_attempt(tmp_path: Path) -> None:
    config = make_config(tmp_path, adapter__command=flaky_command(tmp_path, 3))
    response = QChatAdapter(config).execute("do it")
    assert response.text.strip() == "answer on call 3"
    assert response.attempts == 3


def test_supervisor_succeeds_on_the_third_attempt(tmp_path: Path) -> None:
    config = make_config(tmp_path, adapter__command=flaky_command(tmp_path, 3))
    with Supervisor(config) as supervisor:
        response = supervisor.execute("do it")
    assert response.text.strip() == "answer on call 3"
    assert response.attempts == 3


def test_retries_stop_at_max_retries(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, adapter__command=flaky_command(tmp_path, 10), adapter__max_retries=2
    )
    with pytest.raises(QChatProcessError) as caught:
        QChatAdapter(config).execute("do it")
    assert caught.value.attempts == 3
    assert (tmp_path / "calls").read_text() == "3"


def test_retries_respect_the_callers_deadline(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        adapter__command=flaky_command(tmp_path, 10),
        adapter__max_retries=10,
        adapter__retry_delay=0.4,
        adapter__max_retry_delay=0.4,
    )
    started = time.monotonic()
    with pytest.raises(QChatProcessError):
        QChatAdapter(config).execute("do it", timeout=1.0)
    assert time.monotonic() - started < 3.0  # the deadline and one attempt, at most
    assert int((tmp_path / "calls").read_text()) < 10


def test_rejected_prompt_is_never_retried_and_starts_nothing(tmp_path: Path) -> None:
    count = tmp_path / "count"
    config = make_config(tmp_path, resources__max_prompt_length=10)
    adapter = QChatAdapter(config)
    with pytest.raises(PromptRejected):
        adapter.execute(f"far too long a prompt @sim:count_file={count}")
    assert invocations(count) == 0


def test_breaker_whole_life_on_the_simulator(tmp_path: Path) -> None:
    count = tmp_path / "count"
    config = make_config(
        tmp_path,
        adapter__max_retries=0,
        breaker__fail_max=3,
        breaker__reset_timeout=1.0,
        breaker__storage="disk",
    )
    adapter = QChatAdapter(config)
    throttled = f"busy @sim:failure=throttled @sim:count_file={count}"

    for _ in range(3):
        with pytest.raises(QChatThrottled):
            adapter.execute(throttled)
    assert adapter.guard.breaker.state == "open"

    # Open: refused at once, no process started, the next trial named.
    with pytest.raises(CircuitOpen) as caught:
        adapter.execute(f"fine @sim:count_file={count}")
    assert caught.value.retry_at is not None
    assert invocations(count) == 3

    # After the reset timeout, exactly one trial goes through.
    time.sleep(1.1)
    results: list[object] = []

    def trial() -> None:
        try:
            results.append(adapter.execute(f"fine @sim:latency=0.5 @sim:count_file={count}"))
        except CircuitOpen as error:
            results.append(error)

    threads = [threading.Thread(target=trial) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    answers = [r for r in results if not isinstance(r, CircuitOpen)]
    assert len(answers) == 1
    assert invocations(count) == 4
    assert adapter.guard.breaker.state == "closed"
    assert adapter.execute(f"fine again @sim:count_file={count}").text


def test_supervisor_refuses_with_an_open_breaker_without_a_queue_slot(tmp_path: Path) -> None:
    config = make_config(tmp_path, adapter__max_retries=0, breaker__fail_max=2)
    with Supervisor(config) as supervisor:
        for _ in range(2):
            supervisor.submit("busy @sim:failure=service").exception(timeout=30)
        assert supervisor.stats()["breaker_state"] == "open"

        started = time.monotonic()
        future = supervisor.submit("anything")
        assert isinstance(future.exception(timeout=1), CircuitOpen)
        assert time.monotonic() - started < 0.5
        assert supervisor.stats()["queued"] == 0


SHARED_BREAKER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import make_config
    from ralph_supervisor.adapter import QChatAdapter
    from ralph_supervisor.errors import CircuitOpen

    config = make_config(Path({tmp!r}), adapter__max_retries=0, breaker__fail_max=2,
                         breaker__reset_timeout=60, breaker__storage="disk")
    adapter = QChatAdapter(config)
    try:
        adapter.execute("hello @sim:count_file={count}")
        print("answered")
    except CircuitOpen:
        print("refused")
    """
)


def test_breaker_state_is_shared_by_processes(tmp_path: Path) -> None:
    count = tmp_path / "count"
    config = make_config(
        tmp_path,
        adapter__max_retries=0,
        breaker__fail_max=2,
        breaker__reset_timeout=60,
        breaker__storage="disk",
    )
    adapter = QChatAdapter(config)
    for _ in range(2):
        with pytest.raises(QChatThrottled):
            adapter.execute("busy @sim:failure=throttled")

    script = tmp_path / "other.py"
    tests = str(Path(__file__).parent)
    script.write_text(SHARED_BREAKER_SCRIPT.format(tests=tests, tmp=str(tmp_path), count=count))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "refused", done.stderr
    assert invocations(count) == 0


def test_cache_hit_starts_no_process(tmp_path: Path) -> None:
    count = tmp_path / "count"
    config = make_config(tmp_path)
    adapter = CachedAdapter(QChatAdapter(config))
    prompt = f"what is 6 times 7 @sim:count_file={count}"

    first = adapter.execute(prompt)
    second = adapter.execute(prompt)
    assert invocations(count) == 1
    assert not first.cached and second.cached
    assert second.text == first.text


def test_cache_accepts_a_path_or_a_diskcache(tmp_path: Path) -> None:
    import diskcache

    count = tmp_path / "count"
    config = make_config(tmp_path)
    prompt = f"hello @sim:count_file={count}"

    CachedAdapter(QChatAdapter(config), cache=tmp_path / "mine").execute(prompt)
    store = diskcache.Cache(str(tmp_path / "mine"))
    hit = CachedAdapter(QChatAdapter(config), cache=store).execute(prompt)
    store.close()
    assert hit.cached
    assert invocations(count) == 1


def test_twenty_threads_one_prompt_one_invocation(tmp_path: Path) -> None:
    count = tmp_path / "count"
    config = make_config(tmp_path)
    adapter = CachedAdapter(QChatAdapter(config))
    prompt = f"same question @sim:latency=0.5 @sim:count_file={count}"
    answers: list[str] = []
    barrier = threading.Barrier(20)

    def ask() -> None:
        barrier.wait(10)
        answers.append(adapter.execute(prompt).text)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(answers) == 20
    assert len(set(answers)) == 1
    assert invocations(count) == 1


def test_supervisor_single_flight_and_cache(tmp_path: Path) -> None:
    count = tmp_path / "count"
    config = make_config(tmp_path, performance__max_concurrent=3)
    prompt = f"same question @sim:latency=0.5 @sim:count_file={count}"
    with Supervisor(config) as supervisor:
        futures = [supervisor.submit(prompt) for _ in range(10)]
        texts = {f.result(timeout=30).text for f in futures}
        hit = supervisor.execute(prompt)
        stats = supervisor.stats()
    assert len(texts) == 1
    assert hit.cached
    assert invocations(count) == 1
    assert stats["cache_hits"] == 1


def test_cache_entries_expire_after_ttl(tmp_path: Path) -> None:
    count = tmp_path / "count"
    config = make_config(tmp_path, cache__ttl=0.5)
    adapter = CachedAdapter(QChatAdapter(config))
    prompt = f"hello @sim:count_file={count}"
    adapter.execute(prompt)
    assert adapter.execute(prompt).cached
    time.sleep(0.7)
    assert not adapter.execute(prompt).cached
    assert invocations(count) == 2


def test_failures_are_never_cached(tmp_path: Path) -> None:
    count = tmp_path / "count"
    config = make_config(tmp_path, adapter__max_retries=0)
    adapter = CachedAdapter(QChatAdapter(config))
    prompt = f"hello @sim:exit=2 @sim:count_file={count}"
    for _ in range(2):
        with pytest.raises(QChatProcessError):
            adapter.execute(prompt)
    assert invocations(count) == 2


def test_corrupt_cache_directory_degrades_to_no_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "state" / "cache"
    cache_dir.mkdir(parents=True)
    (cache_dir / "cache.db").write_bytes(b"this is not a sqlite database" * 100)
    count = tmp_path / "count"
    adapter = CachedAdapter(QChatAdapter(make_config(tmp_path)))
    prompt = f"hello @sim:count_file={count}"

    assert adapter.execute(prompt).text
    assert adapter.execute(prompt).text
    assert invocations(count) == 2
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "cach" in r.getMessage()]
    assert len(warnings) == 1


RATE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import make_config
    from ralph_supervisor.adapter import QChatAdapter
    config = make_config(Path({tmp!r}), limits__requests_per_minute=60, limits__burst=3,
                         breaker__storage="memory")
    adapter = QChatAdapter(config)
    end = time.monotonic() + {seconds}
    while time.monotonic() < end:
        try:
            adapter.execute("tick @sim:latency=0 @sim:count_file={count}",
                            timeout=end - time.monotonic())
        except Exception:
            break
    """
)


def test_two_processes_share_a_rate_limit(tmp_path: Path) -> None:
    count = tmp_path / "count"
    seconds = 3.0
    script = tmp_path / "rate.py"
    tests = str(Path(__file__).parent)
    script.write_text(
        RATE_SCRIPT.format(tests=tests, tmp=str(tmp_path), seconds=seconds, count=count)
    )
    started = time.monotonic()
    processes = [
        subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE) for _ in range(2)
    ]
    for process in processes:
        process.wait(60)
    elapsed = time.monotonic() - started

    # The bucket holds 3 and refills at one a second, for both together.
    allowed = 3 + 60 / 60 * elapsed + 1
    assert 3 <= invocations(count) <= allowed


def test_wait_until_helper_is_bounded() -> None:
    started = time.monotonic()
    assert not wait_until(lambda: False, timeout=0.2)
    assert time.monotonic() - started < 1.0


HANG_ONCE_AGENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    counter = Path(sys.argv[1])
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls == 1:
        time.sleep(60)
    print(f"answer on call {calls}")
    """
)


@pytest.mark.parametrize("face", ["adapter", "supervisor"])
def test_attempt_timeout_leaves_time_to_retry_a_hang(tmp_path: Path, face: str) -> None:
    script = tmp_path / "hang_once.py"
    script.write_text(HANG_ONCE_AGENT)
    config = make_config(
        tmp_path,
        adapter__command=[sys.executable, str(script), str(tmp_path / "calls")],
        adapter__timeout=30,
        adapter__attempt_timeout=1.0,
        adapter__kill_grace=0.2,
    )
    started = time.monotonic()
    if face == "adapter":
        response = QChatAdapter(config).execute("hello")
    else:
        with Supervisor(config) as supervisor:
            response = supervisor.execute("hello")
    assert response.text.strip() == "answer on call 2"
    assert response.attempts == 2
    assert time.monotonic() - started < 15
