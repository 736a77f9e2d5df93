"""The HTTP face: /health, /health/detailed and /metrics.

    supervisor thread          server thread             connection threads
    -----------------          -------------             ------------------
    HealthServer.start() ----> serve()          --accept--> one per client,
    HealthServer.stop() -wake->  (select)                   5 s socket timeout,
                                                            route -> handler
                                                            -> snapshot()
                                                            -> metrics.render()

Nothing here runs on the supervisor's thread: a slow or broken client costs
one connection thread until its socket times out, and never blocks the
supervisor or another client's /health. Connections past `max_connections`
are closed at once, so a flood cannot grow threads without bound.

Routes are (method, path) -> handler(request) -> (status, headers, body).
GET routes answer HEAD too. A later console adds its pages and actions with
add_route(); the built-in routes are registered the same way.

The snapshot callable is called from connection threads, concurrently; it
must be safe to call from any thread and should be quick.
"""

from __future__ import annotations

import json
import logging
import math
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil

from ralph_supervisor import __version__
from ralph_supervisor.errors import ConfigError
from ralph_supervisor.metrics import Metrics

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"

# How long one client may stay silent before its connection is dropped. It
# bounds each read, not the whole request: a client that trickles a byte
# every few seconds keeps its thread longer. max_connections bounds what such
# clients cost; a per-connection deadline would close that gap too.
CONNECTION_TIMEOUT_S = 5.0

# The largest request body a route may receive (the console's actions are
# small JSON documents).
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Request:
    """What a route handler sees of one HTTP request."""

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: Message = field(default_factory=Message)
    body: bytes = b""
    client: str = ""


Response = tuple[int, dict[str, str], bytes]
Handler = Callable[[Request], Response]


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    """Build a JSON response; objects JSON cannot carry become strings."""
    body = json.dumps(payload, default=str, ensure_ascii=False).encode("utf-8")
    return status, {"Content-Type": JSON_TYPE, **(headers or {})}, body


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that counts, caps and can close its connections."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's backlog of 5 drops the SYNs of a burst (ten scrapers and
    # probes at once), and each dropped client waits a 1 s retransmit.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        routes: _Routes,
        *,
        max_connections: int,
        timeout_s: float,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.routes = routes
        self.max_connections = max_connections
        self.connection_timeout = timeout_s
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._last_drop_warning = -math.inf
        # stop() writes a byte here to end serve() at once: serve_forever()
        # would notice a shutdown only at its next poll.
        self._wake_reader, self._wake_writer = socket.socketpair()
        super().__init__(address, _RequestHandler)
        # select() may say "readable" for a client that is gone by accept():
        # non-blocking, accept() then fails instead of stalling the loop.
        self.socket.setblocking(False)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that
        # can take seconds on a host with broken DNS. We only need the port.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def serve(self) -> None:
        """Accept connections until wake() is called."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj is self._wake_reader for key, _ in ready):
                    return
                self._accept_one()

    def _accept_one(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            # Out of threads, most likely: this client is lost, not the server.
            log.warning("health server: cannot serve a connection", exc_info=True)
            self.shutdown_request(request)

    def wake(self) -> None:
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._connections) >= self.max_connections:
                self._warn_dropped(client_address)
                self.shutdown_request(request)
                return
            thread = threading.Thread(
                target=self._serve_connection,
                args=(request, client_address),
                name=f"health-conn-{client_address[0]}:{client_address[1]}",
                daemon=True,
            )
            self._connections[thread] = request
        thread.start()

    def _warn_dropped(self, client_address: Any) -> None:
        # Once a minute at most: a flood must not become a flood of logs.
        now = time.monotonic()
        if now - self._last_drop_warning < 60:
            return
        self._last_drop_warning = now
        log.warning(
            "health server: too many connections, dropping new ones",
            extra={"client": client_address[0], "limit": self.max_connections},
        )

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr; a client that hung
        # up mid-response is routine, so it is a debug line here.
        log.debug(
            "health server: connection failed",
            extra={"client": client_address[0]},
            exc_info=True,
        )

    def close_connections(self, deadline: float) -> list[threading.Thread]:
        """Wake every connection thread, wait until deadline; return stragglers."""
        with self._lock:
            connections = list(self._connections.items())
        for _, sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        for thread, _ in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread for thread, _ in connections if thread.is_alive()]


class _Routes:
    def __init__(self) -> None:
        self._table: dict[str, dict[str, Handler]] = {}
        self._lock = threading.Lock()

    def add(self, method: str, path: str, handler: Handler) -> None:
        with self._lock:
            self._table.setdefault(path, {})[method.upper()] = handler

    def find(self, method: str, path: str) -> tuple[Handler | None, list[str]]:
        """Return the handler (or None) and the methods the path allows."""
        with self._lock:
            handlers = dict(self._table.get(path, {}))
        allowed = sorted(set(handlers) | ({"HEAD"} if "GET" in handlers else set()))
        lookup = "GET" if method == "HEAD" and "HEAD" not in handlers else method
        return handlers.get(lookup), allowed


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    server_version = f"ralph-supervisor/{__version__}"
    sys_version = ""
    # One request per connection: a keep-alive client would hold a thread.
    protocol_version = "HTTP/1.0"
    # A two-word request line is HTTP/0.9, whose answers have no status line
    # or headers; nobody speaks it, and garbage parsed as it would get a bare
    # body back. Answer it as 1.0.
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.connection_timeout)

    # "GET / HTTP/0.9" written out, too, is answered as 1.0: the stdlib
    # leaves out the status line and headers whenever the version it parsed
    # is 0.9, even for the errors it sends while parsing the headers.
    @property
    def request_version(self) -> str:
        return self._request_version

    @request_version.setter
    def request_version(self, version: str) -> None:
        self._request_version = "HTTP/1.0" if version == "HTTP/0.9" else version

    def __getattr__(self, name: str) -> Any:
        # Every method (GET, POST, PROPFIND...) goes through the router, which
        # answers 404 or 405 itself, rather than the stdlib's 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        method = self.command
        parts = urlsplit(self.path)

        # Read the body before answering, even a 404: closing a socket with
        # unread data resets it, and the client may lose our answer.
        request_body = self._read_body()
        if request_body is None:
            return

        handler, allowed = self.server.routes.find(method, parts.path)

        if handler is None:
            if allowed:
                status, headers, body = _error(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"{method} is not allowed on {parts.path}",
                    {"Allow": ", ".join(allowed)},
                )
            else:
                status, headers, body = _error(HTTPStatus.NOT_FOUND, "not found")
            self._send(status, headers, body)
            return

        request = Request(
            method=method,
            path=parts.path,
            query=parse_qs(parts.query),
            headers=self.headers,
            body=request_body,
            client=str(self.client_address[0]),
        )
        try:
            status, headers, body = handler(request)
        except Exception as exc:
            log.error(
                "health server: handler failed",
                extra={"method": method, "path": parts.path, "error_type": type(exc).__name__},
                exc_info=True,
            )
            status, headers, body = _error(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}"
            )
        self._send(status, headers, body)

    def _read_body(self) -> bytes | None:
        raw_length = self.headers.get("Content-Length")
        if not raw_length:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            self._send(*_error(HTTPStatus.BAD_REQUEST, "bad Content-Length"))
            return None
        if length < 0 or length > MAX_BODY_BYTES:
            self._send(*_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large"))
            return None
        return self.rfile.read(length)

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.close_connection = True
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError) as exc:
            log.debug(
                "health server: client went away",
                extra={"client": self.client_address[0], "error_type": type(exc).__name__},
            )

    def send_error(
        self, code: int, message: str | None = None, explain: str | None = None
    ) -> None:
        # The stdlib's errors (414, 431, 400) are HTML with the client's bytes
        # in them; ours are JSON like every other answer here.
        if message is None:
            message = self.responses.get(code, ("error",))[0]
        self._send(*_error(code, message))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug(
            "health server: request",
            extra={
                "client": self.client_address[0],
                "request": self.requestline[:200],
                "status": int(code) if str(code).isdigit() else code,
            },
        )

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        # Timeouts and malformed requests: routine for a public port.
        log.debug(
            "health server: %s",
            format % args,
            extra={"client": self.client_address[0]},
        )


class HealthServer:
    """Serves /health, /health/detailed and /metrics from a daemon thread.

    `snapshot()` returns the supervisor's state: {"status": "healthy" |
    "degraded" | "unhealthy", "reasons": [...], "adapter", "version",
    "workers", "breaker", "cache", "loop", "queue"}. Anything but healthy
    answers 503, so a load balancer or a Docker HEALTHCHECK takes it out.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        snapshot: Callable[[], dict[str, Any]],
        metrics: Metrics | None,
        metrics_enabled: bool = True,
        disk_path: str = "/",
        max_connections: int = 64,
        connection_timeout: float = CONNECTION_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.port = port
        self.snapshot = snapshot
        self.metrics = metrics if metrics_enabled else None
        self.disk_path = disk_path
        self.max_connections = max_connections
        self.connection_timeout = connection_timeout
        self._routes = _Routes()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

        self.add_route("GET", "/health", self._get_health)
        self.add_route("GET", "/health/detailed", self._get_health_detailed)
        self.add_route("GET", "/metrics", self._get_metrics)

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve `method path` with handler(request) -> (status, headers, body)."""
        self._routes.add(method, path, handler)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound; port 0 becomes the port chosen."""
        if self._server is None:
            raise RuntimeError("the health server is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread. A bind failure is a ConfigError."""
        if self._server is not None:
            return
        try:
            server = _Server(
                (self.host, self.port),
                self._routes,
                max_connections=self.max_connections,
                timeout_s=self.connection_timeout,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"monitoring.health_check_port: cannot listen on {self.host}:{self.port}: {reason}"
            ) from None

        # The first cpu_percent(interval=None) call returns a meaningless
        # 0.0; calling it now makes the first /health/detailed meaningful.
        psutil.cpu_percent(interval=None)

        self._server = server
        self._thread = threading.Thread(
            target=server.serve,
            name="health-server",
            daemon=True,
        )
        self._thread.start()
        log.info("health server listening", extra={"url": self.url})

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop serving, close the socket, join every thread within timeout.

        Returns False (and logs a warning) when a thread outlived the timeout.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return True
        deadline = time.monotonic() + timeout

        # Stop accepting, then close the listening socket.
        server.wake()
        thread.join(max(0.0, deadline - time.monotonic()))
        server.server_close()

        # Wake the connections blocked on slow clients and wait for them.
        stragglers = server.close_connections(deadline)
        self._server = None
        self._thread = None

        if thread.is_alive() or stragglers:
            log.warning(
                "health server: threads still running after stop",
                extra={"threads": len(stragglers) + thread.is_alive(), "timeout_s": timeout},
            )
            return False
        log.info("health server stopped")
        return True

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Routes.

    def _take_snapshot(self) -> dict[str, Any] | Response:
        try:
            state = dict(self.snapshot())
        except Exception as exc:
            log.error(
                "health snapshot failed",
                extra={"error_type": type(exc).__name__},
                exc_info=True,
            )
            return _error(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"snapshot failed: {type(exc).__name__}"
            )
        return state

    def _get_health(self, request: Request) -> Response:
        state = self._take_snapshot()
        if isinstance(state, tuple):
            return state

        healthy = state.get("status") == "healthy"
        body: dict[str, Any] = {
            "status": state.get("status", "unhealthy"),
            "adapter": state.get("adapter"),
            "version": state.get("version", __version__),
        }
        if not healthy:
            body["reasons"] = list(state.get("reasons") or [])
        return json_response(200 if healthy else 503, body)

    def _get_health_detailed(self, request: Request) -> Response:
        state = self._take_snapshot()
        if isinstance(state, tuple):
            return state

        healthy = state.get("status") == "healthy"
        state.setdefault("version", __version__)
        state["system"] = self._system()
        return json_response(200 if healthy else 503, state)

    def _system(self) -> dict[str, float | None]:
        try:
            disk: float | None = psutil.disk_usage(self.disk_path).percent
        except OSError:
            disk = None
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_percent": psutil.virtual_memory().percent,
            "disk_usage": disk,
        }

    def _get_metrics(self, request: Request) -> Response:
        if self.metrics is None:
            return _error(HTTPStatus.NOT_FOUND, "metrics are disabled")
        body, content_type = self.metrics.render(request.headers.get("Accept"))
        return 200, {"Content-Type": content_type}, body
