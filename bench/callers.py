"""The ways of calling an agent that the benchmarks compare, and how to drive them.

    baselines                        the library, layer by layer
    subprocess.run                   run_call(CallSpec)     the runner alone
    asyncio create_subprocess_exec   QChatAdapter.execute   + the call policy
      + communicate()                WorkerLikeRunner       the runner, as in a worker
                                     Supervisor.execute     + the worker hop

Each caller takes a prompt, returns the answer's text and raises CallFailed
(or the library's own error) when the call did not answer. Times are wall
times taken by the driver around the whole call, as a user sees them: the
supervisor's Response.duration_s is the agent's time, not the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from subprocess import DEVNULL, PIPE, run
from typing import Any

from bench.agents import Agent
from ralph_supervisor.runner import CallSpec, Limits, run_call

Call = Callable[[str], str]


class CallFailed(Exception):
    """A baseline call whose agent did not exit 0."""


def subprocess_run_caller(agent: Agent) -> Call:
    """Plain subprocess.run: no session, no deadline, no classification."""

    def call(prompt: str) -> str:
        done = run(agent.command(prompt), stdin=DEVNULL, capture_output=True)
        if done.returncode != 0:
            raise CallFailed(f"exit status {done.returncode}")
        return done.stdout.decode("utf-8", "replace")

    return call


class AsyncioCaller:
    """asyncio.create_subprocess_exec + communicate(), as the old adapter called q.

    One event loop for all calls, so that a call's time is the call's and
    not an event loop's creation.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.loop = asyncio.new_event_loop()

    async def call_async(self, prompt: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *self.agent.command(prompt), stdin=DEVNULL, stdout=PIPE, stderr=PIPE
        )
        stdout, _ = await process.communicate()
        if process.returncode != 0:
            raise CallFailed(f"exit status {process.returncode}")
        return stdout.decode("utf-8", "replace")

    def __call__(self, prompt: str) -> str:
        return self.loop.run_until_complete(self.call_async(prompt))

    def close(self) -> None:
        self.loop.close()


def call_spec(config: Any, agent: Agent, *, buffer_size: int | None = None) -> CallSpec:
    """A CallSpec like the supervisor's for `config`; prompt and deadline set per call."""
    from ralph_supervisor.agents import CompiledPatterns, profile_for

    limits = Limits(
        buffer_size=buffer_size or config.performance.buffer_size,
        poll_interval=config.performance.poll_interval,
        max_output_size=config.resources.max_output_size,
        max_memory_mb=config.resources.max_memory_mb,
        kill_grace=config.adapter.kill_grace,
    )
    return CallSpec(
        argv=agent.argv,
        prompt="",
        deadline=0.0,
        limits=limits,
        patterns=CompiledPatterns.of(profile_for(config.adapter)),
        agent="sim",
    )


def run_spec(template: CallSpec, prompt: str, timeout: float) -> str:
    spec = dataclasses.replace(template, prompt=prompt, deadline=time.monotonic() + timeout)
    return run_call(spec).text


def runner_caller(config: Any, agent: Agent, *, buffer_size: int | None = None) -> Call:
    """run_call() alone, in this process, as QChatAdapter runs it."""
    template = call_spec(config, agent, buffer_size=buffer_size)
    timeout = float(config.adapter.timeout)

    def call(prompt: str) -> str:
        return run_spec(template, prompt, timeout)

    return call


@dataclass(frozen=True)
class Timed:
    """An answer with the time its caller measured where the call ran."""

    text: str
    seconds: float


class WorkerLikeRunner:
    """run_call() in a process made the way workers are, timed inside it.

    The process comes from the supervisor's fork server, with the worker
    module preloaded, so it has a worker's memory image: what starting an
    agent costs there is what it costs in a worker. The time is taken
    inside the process; the pipe is not in it.
    """

    def __init__(self, config: Any, agent: Agent) -> None:
        context = multiprocessing.get_context("forkserver")
        self.conn, child_conn = context.Pipe()
        template = call_spec(config, agent)
        self.process = context.Process(
            target=serve_timed_calls,
            args=(child_conn, template, float(config.adapter.timeout)),
            name="bench-worker-like",
            daemon=True,
        )
        self.process.start()
        child_conn.close()

    def caller(self) -> Callable[[str], Timed]:
        def call(prompt: str) -> Timed:
            self.conn.send(prompt)
            outcome = self.conn.recv()
            if isinstance(outcome, BaseException):
                raise outcome
            return Timed(outcome[1], outcome[0])

        return call

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def serve_timed_calls(conn: Any, template: CallSpec, timeout: float) -> None:
    """The worker-like process: one timed run_call per request, until None."""
    while True:
        prompt = conn.recv()
        if prompt is None:
            return
        started = time.perf_counter()
        try:
            text = run_spec(template, prompt, timeout)
        except Exception as error:
            conn.send(error)
            continue
        conn.send((time.perf_counter() - started, text))


def adapter_caller(adapter: Any) -> Call:
    def call(prompt: str) -> str:
        return str(adapter.execute(prompt).text)

    return call


def supervisor_caller(supervisor: Any, *, use_cache: bool = False) -> Call:
    """Supervisor.execute; use_cache=False for the overhead, as the runner has none."""

    def call(prompt: str) -> str:
        return str(supervisor.execute(prompt, use_cache=use_cache).text)

    return call


# -- drivers ---------------------------------------------------------------


def interleave(
    callers: Mapping[str, Callable[[str], str | Timed]],
    rounds: int,
    prompt_for: Callable[[int], str],
    *,
    check: Callable[[str], bool] | None = None,
) -> dict[str, list[float]]:
    """Call each caller once per round, in turn; return each one's call times.

    The callers take turns call by call, so that a burst of noise on a shared
    machine lands on all of them alike; the starting caller rotates with the
    round so that none is always first after the others. A caller that
    returns Timed gives its own time (taken where the call ran).
    """
    names = list(callers)
    times: dict[str, list[float]] = {name: [] for name in names}

    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            prompt = prompt_for(round_index)
            started = time.perf_counter()
            outcome = callers[name](prompt)
            elapsed = time.perf_counter() - started
            if isinstance(outcome, Timed):
                answer, elapsed = outcome.text, outcome.seconds
            else:
                answer = outcome
            if check is not None and not check(answer):
                raise CallFailed(f"{name} gave an unexpected answer: {answer[:80]!r}")
            times[name].append(elapsed)
    return times


@dataclass(frozen=True)
class Sample:
    """One call under load: when it went in, when it came back, how it ended."""

    started: float
    ended: float
    ok: bool
    error: str | None = None
    client: int = 0
    prompt: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.started


def closed_loop(
    call: Call,
    clients: int,
    seconds: float,
    prompt_for: Callable[[int, int], str],
    *,
    check: Callable[[str, str], bool] | None = None,
) -> list[Sample]:
    """`clients` threads, each calling again as soon as its call returns.

    Every client has one call in flight at all times, so `clients` calls
    are in flight at once. prompt_for(client, n) names each call; check
    (prompt, answer) says whether an answer is the right one.
    """
    stop_at = time.monotonic() + seconds
    samples: list[Sample] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        count = 0
        while time.monotonic() < stop_at:
            prompt = prompt_for(index, count)
            count += 1
            started = time.monotonic()
            try:
                answer = call(prompt)
                ended = time.monotonic()
                ok = check is None or check(prompt, answer)
                error = None if ok else "WrongAnswer"
                sample = Sample(started, ended, ok, error, index, prompt)
            except Exception as failure:
                ended = time.monotonic()
                sample = Sample(started, ended, False, type(failure).__name__, index, prompt)
            with lock:
                samples.append(sample)

    threads = [
        threading.Thread(target=client, args=(index,), name=f"bench-client-{index}")
        for index in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


def closed_loop_asyncio(
    agent: Agent, clients: int, seconds: float, prompt_for: Callable[[int, int], str]
) -> list[Sample]:
    """closed_loop() for the asyncio baseline: `clients` tasks on one event loop."""
    caller = AsyncioCaller(agent)
    stop_at = time.monotonic() + seconds
    samples: list[Sample] = []

    async def client(index: int) -> None:
        count = 0
        while time.monotonic() < stop_at:
            prompt = prompt_for(index, count)
            count += 1
            started = time.monotonic()
            try:
                await caller.call_async(prompt)
            except Exception as error:
                failed = Sample(started, time.monotonic(), False, type(error).__name__, index)
                samples.append(failed)
            else:
                samples.append(Sample(started, time.monotonic(), True, None, index))

    async def all_clients() -> None:
        await asyncio.gather(*(client(index) for index in range(clients)))

    try:
        caller.loop.run_until_complete(all_clients())
    finally:
        caller.close()
    return samples


def completed_between(samples: Sequence[Sample], start: float, end: float) -> int:
    """Successful calls that ended within [start, end)."""
    return sum(1 for s in samples if s.ok and start <= s.ended < end)


def window_rate(samples: Sequence[Sample], start: float, end: float) -> float:
    """Answered calls per second within [start, end), counting fractions of calls.

    Counting the calls that end in a window is off by up to one call per
    caller: N callers of a fixed-latency agent finish in step, N at a time,
    so a 5 s window of 200 ms calls holds 24 or 25 such bursts. Here a call
    that straddles an edge counts for the part of it inside the window, so
    the figure has no such step, however short the window.
    """

    def progress(mine: list[Sample], moment: float) -> float:
        done = 0.0
        for sample in mine:
            if not sample.ok or sample.started >= moment:
                continue
            if sample.ended <= moment:
                done += 1.0
            else:
                done += (moment - sample.started) / (sample.ended - sample.started)
        return done

    by_client: dict[int, list[Sample]] = {}
    for sample in samples:
        by_client.setdefault(sample.client, []).append(sample)
    answered = sum(progress(mine, end) - progress(mine, start) for mine in by_client.values())
    return answered / (end - start)


@contextlib.contextmanager
def running_supervisor(config: Any) -> Iterator[Any]:
    """A started Supervisor, closed on the way out whatever happens.

    close() drains the calls in flight, stops every worker and kills every
    agent's process group; a benchmark that fails half-way leaves nothing.
    """
    from ralph_supervisor.supervisor import Supervisor

    supervisor = Supervisor(config)
    try:
        supervisor.start()
        yield supervisor
    finally:
        supervisor.close()
