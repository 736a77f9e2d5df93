"""A private redis-server per test: a free loopback port, no persistence.

A test module makes it a fixture:

    @pytest.fixture
    def redis_server(tmp_path):
        yield from serve_redis(tmp_path)

The server carries the session's tag (it inherits the environment), so the
leak check of conftest.py fails a test that leaves it running. Tests that
need one skip, with the reason, when redis-server or the redis package is
missing. Shared states opened during the test are closed after it, so no
reconnection thread outlives it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One redis-server process that a test can stop and start again."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT} s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)


def require_redis() -> None:
    """Skip the test, saying why, without redis-server or the redis package."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip("the redis package is not installed (pip install 'ralph-supervisor[redis]')")


def serve_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """The body of a redis_server fixture: `yield from serve_redis(tmp_path)`."""
    require_redis()
    from ralph_supervisor import backend

    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    opened_before = set(backend._registry)
    try:
        yield server
    finally:
        for key in set(backend._registry) - opened_before:
            with contextlib.suppress(Exception):
                backend.close_shared_state(key or None)
        server.stop()
