"""The health server over real HTTP: routes, codes, slow clients, stop."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from ralph_supervisor.metrics import Metrics
from ralph_supervisor.server import HealthServer, Request, json_response


class State:
    """A snapshot callable whose answer the test changes."""

    def __init__(self) -> None:
        self.value: dict[str, Any] = {
            "status": "healthy",
            "reasons": [],
            "adapter": "q",
            "version": "0.1.0",
            "workers": [{"id": 0, "pid": 1234, "state": "idle"}],
            "breaker": {"q": "closed"},
            "cache": {"hits": 3},
            "loop": [],
            "queue": {"length": 0},
        }
        self.fail = False

    def __call__(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("supervisor state is being rebuilt")
        return self.value


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def metrics() -> Metrics:
    metrics = Metrics()
    metrics.observe_request("q", "success", 0.4)
    return metrics


@pytest.fixture
def server(state: State, metrics: Metrics) -> Iterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0, snapshot=state, metrics=metrics)
    server.start()
    yield server
    assert server.stop(timeout=5)


def fetch(
    server: HealthServer, path: str, method: str = "GET", timeout: float = 5
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(server.url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def raw_request(server: HealthServer, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(server.address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_health_is_200_when_healthy(server):
    status, headers, body = fetch(server, "/health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "healthy", "adapter": "q", "version": "0.1.0"}


def test_health_is_503_with_reasons_when_degraded(server, state):
    state.value.update(status="degraded", reasons=["breaker open for q"])
    status, _, body = fetch(server, "/health")
    assert status == 503
    assert json.loads(body) == {
        "status": "degraded",
        "adapter": "q",
        "version": "0.1.0",
        "reasons": ["breaker open for q"],
    }


def test_detailed_has_the_snapshot_and_system(server, state):
    status, _, body = fetch(server, "/health/detailed")
    detailed = json.loads(body)
    assert status == 200
    assert detailed["workers"] == state.value["workers"]
    assert detailed["queue"] == {"length": 0}
    system = detailed["system"]
    assert set(system) == {"cpu_percent", "memory_percent", "disk_usage"}
    assert all(isinstance(value, float | int) for value in system.values())

    state.value["status"] = "unhealthy"
    assert fetch(server, "/health/detailed")[0] == 503


def test_metrics_are_prometheus_text(server):
    status, headers, body = fetch(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert b'qchat_requests_total{agent="q",outcome="success"} 1.0' in body


@pytest.mark.parametrize("enabled, with_metrics", [(False, True), (True, False)])
def test_metrics_404_when_disabled(state, metrics, enabled, with_metrics):
    server = HealthServer(
        "127.0.0.1",
        0,
        snapshot=state,
        metrics=metrics if with_metrics else None,
        metrics_enabled=enabled,
    )
    with server:
        status, _, body = fetch(server, "/metrics")
        assert status == 404
        assert json.loads(body) == {"error": "metrics are disabled"}
        assert fetch(server, "/health")[0] == 200


def test_head_sends_headers_only(server):
    for path in ("/health", "/health/detailed", "/metrics"):
        status, headers, body = fetch(server, path, method="HEAD")
        assert status == 200, path
        assert body == b""
        assert int(headers["Content-Length"]) > 0

    reply = raw_request(server, b"HEAD /health HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 200")
    assert reply.endswith(b"\r\n\r\n")


def test_unknown_path_is_404_json(server):
    status, headers, body = fetch(server, "/nope")
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": "not found"}
    assert fetch(server, "/health/")[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"])
def test_other_methods_are_405_with_allow(server, method):
    status, headers, body = fetch(server, "/health", method=method)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert "not allowed" in json.loads(body)["error"]


def test_a_failing_snapshot_is_500_and_the_server_lives_on(server, state, caplog):
    state.fail = True
    for path in ("/health", "/health/detailed"):
        status, _, body = fetch(server, path)
        assert status == 500
        assert json.loads(body) == {"error": "snapshot failed: RuntimeError"}
    assert "health snapshot failed" in caplog.text

    state.fail = False
    assert fetch(server, "/health")[0] == 200


def test_added_routes_are_served(server):
    def post_action(request: Request):
        return json_response(202, {"got": request.body.decode(), "q": request.query})

    server.add_route("POST", "/api/action", post_action)
    request = urllib.request.Request(server.url + "/api/action?x=1", data=b"pause", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 202
        assert json.loads(response.read()) == {"got": "pause", "q": {"x": ["1"]}}
    assert fetch(server, "/api/action")[0] == 405


def test_a_failing_route_is_500(server):
    def broken(request: Request):
        raise ZeroDivisionError

    server.add_route("GET", "/broken", broken)
    status, _, body = fetch(server, "/broken")
    assert status == 500
    assert json.loads(body) == {"error": "internal error: ZeroDivisionError"}
    assert fetch(server, "/health")[0] == 200


def test_slow_clients_do_not_delay_health(server):
    sockets = []
    try:
        for number in range(10):
            sock = socket.create_connection(server.address, timeout=5)
            if number % 2:
                sock.sendall(b"GET /hea")
            sockets.append(sock)

        started = time.monotonic()
        status, _, _ = fetch(server, "/health", timeout=2)
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()

    assert status == 200
    assert elapsed < 1.0


def test_a_silent_client_is_dropped_after_the_timeout(state, metrics):
    server = HealthServer("127.0.0.1", 0, snapshot=state, metrics=metrics, connection_timeout=0.3)
    with server, socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"GET /health HT")
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert time.monotonic() - started < 3


def test_a_long_path_is_414_or_404_and_harmless(server):
    status, _, _ = fetch(server, "/" + "a" * 60_000)
    assert status == 404

    try:
        reply = raw_request(server, b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n")
    except ConnectionResetError:
        # The server answered and closed with the rest of the line unread;
        # the kernel may then reset the connection before we read the answer.
        reply = b""
    assert reply == b"" or reply.startswith(b"HTTP/1.0 414")
    assert fetch(server, "/health")[0] == 200


def test_too_many_headers_is_431(server):
    headers = b"".join(b"X-H%d: v\r\n" % number for number in range(200))
    reply = raw_request(server, b"GET /health HTTP/1.0\r\n" + headers + b"\r\n")
    assert reply.startswith(b"HTTP/1.0 431")
    assert b"application/json" in reply


def test_a_garbage_request_is_400(server):
    reply = raw_request(server, b"\x16\x03\x01 hello\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400")
    assert fetch(server, "/health")[0] == 200


def test_requests_are_not_logged_to_stderr(server, capfd):
    fetch(server, "/health")
    fetch(server, "/nope")
    assert capfd.readouterr().err == ""


def test_stop_leaves_no_thread_behind(state, metrics):
    before = set(threading.enumerate())
    server = HealthServer("127.0.0.1", 0, snapshot=state, metrics=metrics)
    server.start()
    address = server.address
    assert address[1] > 0
    idle = [socket.create_connection(address, timeout=5) for _ in range(3)]
    try:
        assert fetch(server, "/health")[0] == 200
        started = time.monotonic()
        assert server.stop(timeout=5)
        assert time.monotonic() - started < 2
    finally:
        for sock in idle:
            sock.close()

    assert set(threading.enumerate()) <= before
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1).close()


def test_a_port_in_use_is_a_config_error(server, state):
    from ralph_supervisor.errors import ConfigError

    host, port = server.address
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
        HealthServer(host, port, snapshot=state, metrics=None).start()
