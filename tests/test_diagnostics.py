"""Diagnostics: systemd notifications over a real socket, and the dump file."""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ralph_supervisor import diagnostics
from ralph_supervisor.diagnostics import SystemdNotifier, watchdog_interval, write_dump


@pytest.fixture
def notify_socket(tmp_path, monkeypatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notifications_arrive_as_datagrams(notify_socket):
    notifier = SystemdNotifier.from_env()
    assert notifier is not None

    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.status("2 workers\nbreaker closed")
    assert notifier.stopping()

    received = [notify_socket.recv(4096).decode() for _ in range(4)]
    assert received == [
        "READY=1",
        "WATCHDOG=1",
        "STATUS=2 workers breaker closed",
        "STOPPING=1",
    ]


def test_ready_can_carry_a_status_and_reloading_a_timestamp(notify_socket):
    notifier = SystemdNotifier.from_env()
    assert notifier is not None
    notifier.ready(status="serving")
    notifier.reloading()

    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"
    reloading = notify_socket.recv(4096).decode()
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reloading)


def test_abstract_socket_names(monkeypatch):
    name = f"ralph-supervisor-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

        notifier = SystemdNotifier.from_env()
        assert notifier is not None
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"


def test_no_notifier_without_a_unix_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert SystemdNotifier.from_env() is None
    assert SystemdNotifier.from_env({"NOTIFY_SOCKET": ""}) is None
    assert SystemdNotifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_a_failed_send_never_raises_and_logs_once(tmp_path, caplog):
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.DEBUG, logger="ralph_supervisor.diagnostics"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()

    failures = [r for r in caplog.records if "notification failed" in r.getMessage()]
    assert len(failures) == 1


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch):
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    own = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(own) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None

    monkeypatch.setenv("WATCHDOG_USEC", "500000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 0.25
    assert SystemdNotifier("/nowhere").watchdog_interval() == 0.25


SNAPSHOT = {
    "status": "degraded",
    "reasons": ["breaker open for q"],
    "workers": [
        {
            "id": 0,
            "pid": 4242,
            "state": "busy",
            "request_id": "r-17",
            "prompt_sha": "a1b2c3d4e5f6",
            "age_s": 12.34,
            "restarts": 2,
        },
        {"id": 1, "pid": 4243, "state": "idle", "restarts": 0},
    ],
    "queue": {"length": 3, "oldest_age_s": 1.5},
}


@pytest.fixture
def parked_thread() -> Iterator[threading.Thread]:
    release = threading.Event()

    def wait_for_the_dump() -> None:
        release.wait(30)

    thread = threading.Thread(target=wait_for_the_dump, name="parked-for-dump")
    thread.start()
    yield thread
    release.set()
    thread.join(5)


def _path_with(monkeypatch, directory: Path) -> None:
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}/usr/bin{os.pathsep}/bin")


def test_write_dump_writes_a_private_file_with_stacks(tmp_path, monkeypatch, parked_thread):
    _path_with(monkeypatch, tmp_path / "empty-bin")

    path = write_dump(SNAPSHOT, tmp_path / "state")

    assert path.parent == tmp_path / "state" / "diagnostics"
    assert re.fullmatch(rf"dump-\d{{8}}T\d{{6}}\.\d{{3}}Z-{os.getpid()}\.txt", path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "status: degraded (reasons: breaker open for q)" in text
    assert re.search(r"^0\s+4242\s+busy\s+r-17\s+a1b2c3d4e5f6\s+12\.3\s+2$", text, re.M)
    assert '"oldest_age_s": 1.5' in text
    assert "--- thread MainThread" in text
    assert "--- thread parked-for-dump" in text
    assert "wait_for_the_dump" in text
    assert "pip install 'ralph-supervisor[diagnostics]'" in text


def test_two_dumps_at_once_get_two_files(tmp_path, monkeypatch):
    _path_with(monkeypatch, tmp_path / "empty-bin")
    paths = {write_dump({}, tmp_path, worker_pids=[]) for _ in range(3)}
    assert len(paths) == 3


def _fake_py_spy(directory: Path, body: str) -> None:
    directory.mkdir()
    script = directory / "py-spy"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def test_py_spy_runs_for_each_worker(tmp_path, monkeypatch):
    _fake_py_spy(tmp_path / "bin", 'echo "Thread 1 (idle): $1 $2 $3"')
    _path_with(monkeypatch, tmp_path / "bin")

    text = write_dump(SNAPSHOT, tmp_path).read_text()

    assert "--- worker pid 4242 ---\nThread 1 (idle): dump --pid 4242" in text
    assert "--- worker pid 4243 ---\nThread 1 (idle): dump --pid 4243" in text
    assert "not installed" not in text


def test_a_hung_py_spy_is_cut_off(tmp_path, monkeypatch):
    _fake_py_spy(tmp_path / "bin", "exec sleep 30")
    _path_with(monkeypatch, tmp_path / "bin")

    started = time.monotonic()
    text = write_dump(SNAPSHOT, tmp_path, py_spy_timeout=0.5).read_text()

    # One deadline for all workers, not one per worker.
    assert time.monotonic() - started < 3
    assert text.count("py-spy did not finish within 0.5 s") == 2


def test_render_dump_survives_odd_snapshots():
    text = diagnostics.render_dump(
        {"workers": ["not a dict", {"pid": "x"}], "queue": object()}, worker_pids=[]
    )
    assert "== threads of pid" in text
