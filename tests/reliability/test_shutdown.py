"""Shutdown under load: SIGTERM with twenty calls in flight.

An owner process runs a Supervisor with max_concurrent 20 and its signal
handlers installed, starts twenty calls (and queues ten more), and waits for
every one of the twenty agents to run. Then the test sends SIGTERM:

- the owner exits 0 within drain_timeout plus the kill grace (and a little
  for the interpreter to finish);
- a call that can end within the drain finishes; one that cannot (a long
  call, a hang that ignores SIGTERM) fails with SupervisorClosed; so do the
  queued calls; no Future is left waiting;
- nothing of the owner's survives: workers, agents, the fork server.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from .conftest import OWNER_PRELUDE, ProcessLedger, describe, owner_process, sizes

IN_FLIGHT = 20
QUEUED = 10
DRAIN_TIMEOUT = 6.0
KILL_GRACE = 1.0
# Interpreter start-up is not in it, but tearing down the owner's Python is.
EXIT_SLACK = 2.5

OWNER = (
    OWNER_PRELUDE
    + """
from concurrent.futures import TimeoutError as FutureTimeout
from ralph_supervisor.supervisor import Supervisor

# Calls that finish inside the drain, calls that outlast it, and hangs that
# ignore SIGTERM: all three must end by the drain deadline.
KINDS = ["short"] * 10 + ["long"] * 6 + ["hang"] * 4
PROMPTS = {
    "short": "short {i} @sim:latency=4",
    "long": "long {i} @sim:latency=60",
    "hang": "hang {i} @sim:hang=1 @sim:ignore_sigterm=1",
    "queued": "queued {i} @sim:latency=0.1",
}

def main():
    config = make_config(
        Path(sys.argv[1]),
        performance__max_concurrent=20,
        cache__enabled=False,
        adapter__timeout=120,
        adapter__kill_grace=float(sys.argv[2]),
        supervisor__drain_timeout=float(sys.argv[3]),
        supervisor__hang_grace=5,
    )
    supervisor = Supervisor(config)
    supervisor.start(wait_ready=60)
    supervisor.install_signal_handlers()

    calls = [(kind, supervisor.submit(PROMPTS[kind].format(i=i))) for i, kind in enumerate(KINDS)]
    calls += [("queued", supervisor.submit(PROMPTS["queued"].format(i=i))) for i in range(10)]

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = supervisor.stats()["workers"]
        if sum(1 for w in workers if w["state"] == "busy" and w["agent_pgid"]) == 20:
            break
        time.sleep(0.02)
    stats = supervisor.stats()
    print(json.dumps({
        "in_flight": stats["in_flight"],
        "pids": [w["pid"] for w in stats["workers"]] + [w["agent_pgid"] for w in stats["workers"]],
    }), flush=True)

    supervisor.stop_requested.wait(120)
    supervisor.close()
    outcomes = {}
    for kind, future in calls:
        try:
            error = future.exception(timeout=1)
            name = "ok" if error is None else type(error).__name__
        except FutureTimeout:
            name = "unresolved"
        outcomes.setdefault(kind, {}).setdefault(name, 0)
        outcomes[kind][name] += 1
    print(json.dumps({"outcomes": outcomes}), flush=True)

if __name__ == "__main__":
    main()
"""
)


@pytest.mark.parametrize("rounds", sizes(1, 5, bounded_timeout=90, full_timeout=400))
def test_sigterm_with_twenty_calls_in_flight_drains_and_exits_zero(
    tmp_path: Path, rounds: int, report
) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    exit_times = []
    totals: dict[str, dict[str, int]] = {}
    ledger = ProcessLedger()

    for round_number in range(rounds):
        workdir = tmp_path / f"round-{round_number}"
        workdir.mkdir()
        args = (str(workdir), str(KILL_GRACE), str(DRAIN_TIMEOUT))
        with owner_process(script, *args) as owner:
            ready = json.loads(owner.line(timeout=90))
            assert ready["in_flight"] == IN_FLIGHT, owner.stderr_text
            ledger.note(owner.pid)
            for pid in ready["pids"]:
                ledger.note(pid)
            ledger.note_session()

            sent = time.monotonic()
            os.kill(owner.pid, signal.SIGTERM)
            code = owner.wait(timeout=DRAIN_TIMEOUT + KILL_GRACE + 30)
            exit_times.append(time.monotonic() - sent)

            assert code == 0, owner.stderr_text
            outcomes = json.loads(owner.stdout[-1])["outcomes"]
            survivors = ledger.wait_for_none(timeout=5)
            assert not survivors, describe(survivors)

        for kind, counts in outcomes.items():
            for name, count in counts.items():
                totals.setdefault(kind, {}).setdefault(name, 0)
                totals[kind][name] += count
        assert "Traceback" not in owner.stderr_text, owner.stderr_text
        assert outcomes["short"] == {"ok": 10}, outcomes
        for kind in ("long", "hang"):
            assert set(outcomes[kind]) == {"SupervisorClosed"}, outcomes
        # A queued call may have taken the slot of a short one before SIGTERM.
        assert set(outcomes["queued"]) <= {"ok", "SupervisorClosed"}, outcomes

    report(
        "shutdown",
        rounds=rounds,
        in_flight=IN_FLIGHT,
        queued=QUEUED,
        drain_timeout=DRAIN_TIMEOUT,
        kill_grace=KILL_GRACE,
        exit_s_max=round(max(exit_times), 2),
        exit_s_min=round(min(exit_times), 2),
        outcomes=totals,
        processes_tracked=len(ledger),
        orphans=0,
    )
    assert max(exit_times) <= DRAIN_TIMEOUT + KILL_GRACE + EXIT_SLACK, exit_times
