"""A health probe for Docker HEALTHCHECK and scripts: standard library only.

    python /app/config/healthcheck.py [--host HOST] [--port PORT] [--timeout S]

Asks GET /health of a running `ralph-supervisor start` and exits 0 when it
answers 200, 1 otherwise: 503 (starting, degraded, unhealthy, shutting
down), any other status, a refused or silent connection, a timeout. It
never exits 2, which Docker reserves.

The address: the flags, else QCHAT_HEALTH_HOST and QCHAT_HEALTH_PORT (the
variables the server itself reads), else 127.0.0.1:8080. A wildcard host
(0.0.0.0, ::) is where the server listens, not an address to ask: the probe
asks loopback instead, so one QCHAT_HEALTH_HOST=0.0.0.0 serves the server
in a container and the probe inside it.

It prints one line, which `docker inspect` shows in the health log. It uses
http.client rather than urllib: urllib would send the probe through an
HTTP_PROXY set for the agent's sake.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from typing import NoReturn

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_TIMEOUT_S = 5.0

HEALTHY = 0
UNHEALTHY = 1

WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}

# Enough for /health's JSON; a larger body is not a health answer.
MAX_BODY_BYTES = 64 * 1024


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2 on bad usage; Docker reserves 2.
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(UNHEALTHY)


def probe_address(host: str | None, port: str | int | None) -> tuple[str, int]:
    """The (host, port) to ask: a wildcard host becomes loopback."""
    host = (host if host is not None else os.environ.get("QCHAT_HEALTH_HOST", "")).strip()
    raw_port = port if port is not None else os.environ.get("QCHAT_HEALTH_PORT", "").strip()
    host = WILDCARDS.get(host, host)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(raw_port) if raw_port != "" else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"the port is not a number: {raw_port!r}") from None
    if not 0 < number < 65536:
        # Port 0 means "a free port" to the server; only it knows which.
        raise ValueError(f"cannot probe port {number}: give the port the server bound")
    return host, number


def check(host: str, port: int, timeout_s: float, path: str = "/health") -> tuple[int, str]:
    """GET path within timeout_s in all; return (exit code, one line to print)."""
    deadline = time.monotonic() + timeout_s
    url = f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.connect()
        # One deadline for the whole exchange: each step gets what is left.
        # Keep our own reference: the connection lets go of its socket once
        # a "Connection: close" response is read.
        sock = connection.sock
        sock.settimeout(remaining())
        connection.request("GET", path, headers={"Accept": "application/json"})
        sock.settimeout(remaining())
        response = connection.getresponse()
        sock.settimeout(remaining())
        body = response.read(MAX_BODY_BYTES)
    except TimeoutError:
        return UNHEALTHY, f"unhealthy: no answer from {url} within {timeout_s:g} s"
    except (OSError, http.client.HTTPException) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return UNHEALTHY, f"unhealthy: {url}: {reason}"
    finally:
        connection.close()

    status, reasons = _summary(body)
    line = f"{status or 'status unknown'}: HTTP {response.status} from {url}"
    if reasons:
        line += " (" + "; ".join(reasons) + ")"
    return (HEALTHY if response.status == 200 else UNHEALTHY), line


def _summary(body: bytes) -> tuple[str | None, list[str]]:
    try:
        payload = json.loads(body)
    except ValueError:
        return None, []
    if not isinstance(payload, dict):
        return None, []
    status = payload.get("status")
    reasons = payload.get("reasons") or []
    if not isinstance(reasons, list):
        reasons = [str(reasons)]
    return (str(status) if status is not None else None), [str(r) for r in reasons]


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="healthcheck.py",
        description="Exit 0 when ralph-supervisor's /health answers 200, 1 otherwise.",
    )
    parser.add_argument("--host", help="default: QCHAT_HEALTH_HOST, else 127.0.0.1")
    parser.add_argument("--port", help="default: QCHAT_HEALTH_PORT, else 8080")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds for the whole check (default: {DEFAULT_TIMEOUT_S:g})",
    )
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")

    try:
        host, port = probe_address(args.host, args.port)
    except ValueError as error:
        print(f"unhealthy: {error}")
        return UNHEALTHY

    code, line = check(host, port, args.timeout)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
