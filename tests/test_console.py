"""The console's state and actions over real HTTP, against a running `start`.

No browser here (tests/test_console_browser.py drives the page): /api/state
and /api/action are called with urllib, the token rules are checked for each
action, and the small parts (log tail, history reader, token file) are
checked on their own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from ralph_supervisor.console import (
    ACTIONS,
    HistoryTail,
    LogTail,
    is_loopback,
    resolve_token,
    token_from_file,
)

CLI = [sys.executable, "-m", "ralph_supervisor"]

# Slow enough that the loop is still running when the test acts on it, fast
# enough that a drain takes a moment.
LATENCY_S = "0.3"

CONFIG = """\
performance:
  max_concurrent: 2
adapter:
  max_retries: 0
  retry_delay: 0.05
  kill_grace: 0.5
breaker:
  storage: memory
loop:
  git_commit: false
supervisor:
  drain_timeout: 10
  hang_grace: 2
"""


def checklist(items: int) -> str:
    return "".join(f"- [ ] step {n}\n" for n in range(1, items + 1))


class Run:
    """One `ralph-supervisor start` on the simulator, in its own session."""

    def __init__(
        self,
        tmp_path: Path,
        config: str = CONFIG,
        env: dict[str, str] | None = None,
        token: str | None = None,
        git: bool = False,
    ) -> None:
        self.workdir = tmp_path / "work"
        self.workdir.mkdir()
        (self.workdir / "PROMPT.md").write_text(checklist(400))
        if git:
            subprocess.run(["git", "init", "-q", str(self.workdir)], check=True, timeout=30)
        self.state_dir = self.workdir / ".ralph"
        config_path = tmp_path / "ralph.yaml"
        config_path.write_text(config)
        home = tmp_path / "home"
        home.mkdir()

        child_env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("QCHAT_", "HEALTH_CHECK", "NOTIFY_SOCKET", "WATCHDOG_"))
        }
        child_env.update(HOME=str(home), QCHAT_SIM_LATENCY=LATENCY_S)
        child_env.update(env or {})
        self.stderr_path = tmp_path / "start.err"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [
                    *CLI,
                    "start",
                    "--agent",
                    "sim",
                    "--workdir",
                    str(self.workdir),
                    "--health-port",
                    "0",
                    "--config",
                    str(config_path),
                ],
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            self.port = self._wait_for_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.token_value = token or token_from_file(self.state_dir)
            # health.json comes before the workers: wait for them.
            if not wait_until(self._workers_up, 20):
                pytest.fail(f"the workers did not come up:\n{self.stderr()}")
        except BaseException:
            self.kill()
            raise

    def _workers_up(self) -> bool:
        state = self.state(self.token_value)
        return bool(state["workers"]) and state["workers_alive"] == len(state["workers"])

    def _wait_for_port(self) -> int:
        health_file = self.state_dir / "health.json"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"start exited {self.process.returncode}:\n{self.stderr()}")
            try:
                record = json.loads(health_file.read_text())
            except (OSError, ValueError):
                record = {}
            if record.get("pid") == self.process.pid and record.get("port"):
                return int(record["port"])
            time.sleep(0.05)
        pytest.fail(f"no health.json within 20 s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def token(self) -> str:
        token = token_from_file(self.state_dir)
        assert token, "no console token file"
        return token

    def state(self, token: str | None = None) -> dict[str, Any]:
        status, body = call(self.url + "/api/state", token=token)
        assert status == 200, body
        return json.loads(body)

    def loop(self) -> dict[str, Any]:
        return self.state()["loops"][0]

    def wait_exit(self, timeout: float = 20) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"start did not stop within {timeout} s:\n{self.stderr()}")

    def stop(self) -> None:
        """SIGTERM and wait for the drain; SIGKILL the group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    started = Run(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def call(
    url: str,
    *,
    method: str = "GET",
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def act(run: Run, payload: Any, token: str | None) -> tuple[int, dict[str, Any]]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, body = call(
        run.url + "/api/action",
        method="POST",
        token=token,
        body=raw,
        headers={"Content-Type": "application/json"},
    )
    return status, json.loads(body)


EXAMPLES = {
    "stop": {"action": "stop"},
    "reload": {"action": "reload"},
    "restart_worker": {"action": "restart_worker", "slot": 0},
    "close_breaker": {"action": "close_breaker", "agent": "sim"},
}


# -- a running start --------------------------------------------------------------


def test_state_shape_and_the_loop_advancing(run: Run) -> None:
    assert wait_until(lambda: run.loop()["iteration"] >= 2, timeout=15), run.stderr()
    state = run.state()

    assert state["status"] == "healthy" and state["reasons"] == []
    assert state["adapter"] == "sim" and state["pid"] == run.process.pid
    assert len(state["workers"]) == 2
    for worker in state["workers"]:
        assert {"slot", "pid", "state", "requests", "restarts", "request_age_s"} <= set(worker)
        assert "memory_bytes" in worker
    assert sum(worker["requests"] for worker in state["workers"]) >= 2

    (agent,) = state["agents"]
    assert agent["name"] == "sim" and agent["breaker"]["state"] == "closed"
    assert agent["retry_in_s"] is None
    assert {"calls", "successes", "errors", "ratelimit_wait_s"} <= set(agent)
    assert set(state["queue"]) == {"queued", "in_flight"}

    (loop,) = state["loops"]
    assert loop["task"] == "work" and loop["max_iterations"] == 100
    assert loop["status"] == "running" and loop["last_outcome"] == "success"
    assert loop["runtime_s"] > 0 and loop["stop_reason"] is None
    # Written by the loop when it keeps a history; absent, the chart says so.
    assert loop["history"] is None or isinstance(loop["history"], list)

    assert state["latency"]["interval_s"] > 0
    assert state["latency"]["samples"], "the sampler takes its first sample at start"
    messages = [line["message"] for line in state["log"]]
    assert any("console at" in message for message in messages)
    assert any("iteration 1" in message for message in messages)
    assert state["console"] == {"read_needs_token": False, "prompts_shown": False}

    status, page = call(run.url + "/")
    assert status == 200 and "ralph-supervisor console" in page and "/api/state" in page


def test_actions_need_the_token(run: Run) -> None:
    token_file = run.state_dir / "console.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = run.token()
    assert len(token) >= 32

    # Without a token, or with a wrong one: 403, and nothing happens.
    pids = [worker["pid"] for worker in run.state()["workers"]]
    for name in ACTIONS:
        for wrong in (None, "", "not-the-token", token + "x"):
            status, body = act(run, EXAMPLES[name], wrong)
            assert status == 403, (name, wrong, body)
            assert "token" in body["error"]
    # A query token opens the page, never an action.
    status, _ = call(
        run.url + f"/api/action?token={token}",
        method="POST",
        body=json.dumps(EXAMPLES["reload"]).encode(),
    )
    assert status == 403
    time.sleep(0.5)
    assert run.process.poll() is None
    assert [worker["pid"] for worker in run.state()["workers"]] == pids

    # Bad requests with the right token: 400 and a JSON error, never a traceback.
    for bad in (
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        {"action": "explode"},
        {"slot": 0},
        {"action": "restart_worker"},
        {"action": "restart_worker", "slot": 99},
        {"action": "restart_worker", "slot": "0"},
        {"action": "restart_worker", "slot": True},
        {"action": "close_breaker"},
        {"action": "close_breaker", "agent": "nobody"},
    ):
        status, body = act(run, bad, token)
        assert status == 400, (bad, body)
        assert set(body) == {"error"} and "Traceback" not in body["error"], body

    # The right token: each action is done.
    status, body = act(run, EXAMPLES["close_breaker"], token)
    assert (status, body["state"]) == (200, "closed"), body

    status, body = act(run, EXAMPLES["reload"], token)
    assert status == 200, body
    assert wait_until(
        lambda: any("configuration reloaded" in line["message"] for line in run.state()["log"]),
        timeout=10,
    )

    status, body = act(run, EXAMPLES["restart_worker"], token)
    assert status == 200, body
    assert wait_until(lambda: run.state()["workers"][0]["pid"] not in (None, pids[0]), timeout=15)

    status, body = act(run, EXAMPLES["stop"], token)
    assert status == 200, body
    assert run.wait_exit() == 0, run.stderr()
    assert not token_file.exists(), "the token file goes with the run"
    checkpoint = json.loads((run.state_dir / "checkpoint.json").read_text())
    assert checkpoint["status"] == "stopped"


def test_reading_needs_no_token_on_loopback_but_a_loopback_host(run: Run) -> None:
    # A page elsewhere that rebinds its name to 127.0.0.1 sends its own Host.
    status, body = call(run.url + "/api/state", headers={"Host": f"evil.example:{run.port}"})
    assert status == 403 and "not a loopback name" in body, body
    status, page = call(run.url + "/", headers={"Host": "evil.example"})
    assert status == 403 and "not a loopback name" in page and "evil.example" in page
    status, _ = call(run.url + "/api/state", headers={"Host": "evil.example"}, token=run.token())
    assert status == 200
    for host in (f"localhost:{run.port}", f"127.0.0.1:{run.port}", "[::1]:80"):
        assert call(run.url + "/api/state", headers={"Host": host})[0] == 200, host


def test_reading_needs_the_token_beyond_loopback(tmp_path: Path) -> None:
    config = CONFIG + "monitoring:\n  health_check_host: 0.0.0.0\n"
    secret = "s3cret-console-token-for-the-test"
    started = Run(tmp_path, config, env={"QCHAT_CONSOLE_TOKEN": secret}, token=secret)
    try:
        # A configured token: no token file.
        assert not (started.state_dir / "console.token").exists()

        for path in ("/", "/api/state"):
            for wrong in (None, "nope"):
                status, _ = call(started.url + path, token=wrong)
                assert status == 403, (path, wrong)
        status, page = call(started.url + "/")
        assert "needs its token" in page and "<form" in page

        state = started.state(token=secret)
        assert state["console"]["read_needs_token"] is True
        assert call(started.url + f"/?token={secret}")[0] == 200
        assert call(started.url + f"/api/state?token={secret}")[0] == 200
        assert call(started.url + "/?token=wrong")[0] == 403

        # The health routes stay open to probes.
        assert call(started.url + "/health")[0] in (200, 503)

        status, body = act(started, {"action": "stop"}, secret)
        assert status == 200, body
        assert started.wait_exit() == 0, started.stderr()
    finally:
        started.stop()


# -- the parts ----------------------------------------------------------------------


def test_token_file_is_private_and_a_configured_token_replaces_it(tmp_path: Path) -> None:
    token, path = resolve_token(None, tmp_path)
    assert path == tmp_path / "console.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token_from_file(tmp_path) == token
    assert resolve_token(None, tmp_path)[0] != token, "a new run, a new token"

    for blank in ("", "   "):
        assert resolve_token(blank, tmp_path)[1] is not None

    token, path = resolve_token(" configured ", tmp_path)
    assert (token, path) == ("configured", None)
    assert not (tmp_path / "console.token").exists(), "no stale token left to copy"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_log_tail_keeps_the_last_lines_without_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    tail = LogTail(capacity=3)
    logger = logging.getLogger("ralph_supervisor.test_console")
    logger.addHandler(tail)
    logger.setLevel(logging.INFO)
    try:
        for n in range(5):
            logger.info("line %d", n, extra={"request_id": f"r{n}", "prompt": "SECRET"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.error("failed", exc_info=True)
        monkeypatch.setattr("ralph_supervisor.console.prompts_loggable", lambda: True)
        logger.info("debugging", extra={"prompt": "shown in debug"})
    finally:
        logger.removeHandler(tail)

    lines = tail.lines()
    assert [line["message"] for line in lines] == ["line 4", "failed", "debugging"]
    assert lines[0]["fields"] == {"request_id": "r4"}
    assert lines[1]["fields"]["error"] == "ValueError: boom"
    assert lines[2]["fields"]["prompt"] == "shown in debug"
    assert json.dumps(lines)


def test_history_tail_reads_the_last_records(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    reader = HistoryTail(path, records=2)
    assert reader.read() is None, "no file: nothing to draw, no error"

    records = [
        {"number": 1, "duration_s": 1.5, "outcome": "success", "lines_added": 3},
        {"iteration": 2, "duration": 2, "outcome": "throttled", "lines": {"added": 1}},
        "not an object",
        {"number": 3, "duration_s": 0.5, "outcome": "success", "lines_removed": 4},
    ]
    text = "".join(json.dumps(record) + "\n" for record in records)
    path.write_text(text + '{"number": 4, "dur')  # a line being written
    got = reader.read()
    assert got is not None
    assert [record["number"] for record in got] == [2, 3]
    assert got[0] == {
        "number": 2,
        "duration_s": 2,
        "outcome": "throttled",
        "lines_added": 1,
        "lines_removed": None,
    }

    with open(path, "a") as stream:
        stream.write('ation_s": 1.0, "outcome": "complete"}\n')
    got = reader.read()
    assert got is not None
    assert [record["number"] for record in got] == [3, 4]


def test_the_page_is_one_file_with_nothing_to_fetch() -> None:
    from importlib import resources

    page = resources.files("ralph_supervisor").joinpath("console_page.html").read_text()
    for outside in ("http://", "https://", "src=", "@import"):
        # The SVG namespace is a name, not a fetch.
        assert page.replace("http://www.w3.org/2000/svg", "").count(outside) == 0, outside
    assert "innerHTML" not in page, "log lines are text, never markup"


def test_the_page_ships_in_the_wheel() -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert "console_page.html" in pyproject, (
        'pyproject.toml needs "ralph_supervisor" = ["console_page.html"] '
        "under [tool.setuptools.package-data]"
    )
