"""The operator's console: one page on the health server, its state and its actions.

    browser                        health server threads        the service
    -------                        ---------------------        -----------
    GET /            ------------> the page (console_page.html)
    GET /api/state   --every 1.5s> Console.state() ----------> snapshot(), stats(),
                                     + latency samples           progress(), history.jsonl
                                     + log tail
    POST /api/action --token-----> stop: SIGTERM to ourselves (the drain)
                                   reload: Supervisor.reload() (SIGHUP's path)
                                   restart_worker: Supervisor.restart_worker(slot)
                                   close_breaker: the agent's breaker.force_close()

    console-sampler thread: every SAMPLE_INTERVAL_S, Metrics.latency_percentiles()
    into a ring buffer, so the latency chart has a past when the page opens.
    LogTail: a handler on the ralph_supervisor logger keeps the last lines.

Actions need the token: monitoring.console_token, or a random one written to
STATE_DIR/console.token (mode 0600) at start. Reading needs it too when the
server listens on anything but a loopback address. Without a token, a
loopback server answers only requests whose Host header names a loopback
host: a web page elsewhere cannot read the state through DNS rebinding.

Everything here runs on the server's connection threads or the sampler
thread, never on the supervisor's: a slow reader costs its own connection.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any

from ralph_supervisor.checkpoint import write_atomic
from ralph_supervisor.logs import NAMESPACE, extra_fields, prompts_loggable
from ralph_supervisor.server import HealthServer, Request, Response, json_response

log = logging.getLogger(__name__)

TOKEN_FILE_NAME = "console.token"
HISTORY_FILE_NAME = "history.jsonl"
PAGE_RESOURCE = "console_page.html"

# The latency chart: a rolling one-minute p50 and p99, sampled every few
# seconds, for the last ten minutes.
SAMPLE_INTERVAL_S = 5.0
SAMPLE_WINDOW_S = 60.0
SAMPLES_KEPT = 120

# The log tail: lines kept, and how long one message or field may be.
LOG_LINES_KEPT = 200
LOG_TEXT_MAX = 500

# The iterations chart: the last iterations of each task, read from the end
# of its history.jsonl (never the whole file: a long run makes it large).
HISTORY_RECORDS = 60
HISTORY_TAIL_BYTES = 256 * 1024

# Fields that may carry a prompt or an answer: the log tail shows them only
# in debug mode, as the log itself does.
PROMPT_FIELDS = frozenset(
    {
        "prompt",
        "answer",
        "text",
        "output",
        "stdout",
        "stderr",
        "response",
        "partial_output",
        "stderr_tail",
    }
)

ACTIONS = ("stop", "reload", "restart_worker", "close_breaker")

_BEARER = re.compile(r"^\s*Bearer\s+(\S+)\s*$", re.IGNORECASE)


# ---------------------------------------------------------------------------
# The token


def resolve_token(configured: str | None, state_dir: Path) -> tuple[str, Path | None]:
    """Return the console token and the file it was written to (None if configured).

    A configured token is used as it is, and a token file left by an earlier
    run is removed, so that nobody copies a token that no longer works. Without
    one, a random token is written to STATE_DIR/console.token, mode 0600.
    """
    path = state_dir / TOKEN_FILE_NAME
    if configured and configured.strip():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return configured.strip(), None

    token = secrets.token_urlsafe(32)
    write_atomic(path, (token + "\n").encode("ascii"), mode=0o600)
    return token, path


def is_loopback(host: str) -> bool:
    """Say whether a listening address (or a Host header's name) is loopback only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8080" -> "::1")."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


# ---------------------------------------------------------------------------
# The log tail


class LogTail(logging.Handler):
    """Keeps the last log records as small dicts for the page; never raises."""

    def __init__(self, capacity: int = LOG_LINES_KEPT) -> None:
        super().__init__()
        self._lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._lines_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self._line(record)
        except Exception:
            # A record that cannot be shown costs its line, never the caller.
            return
        with self._lines_lock:
            self._lines.append(line)

    def _line(self, record: logging.LogRecord) -> dict[str, Any]:
        show_prompts = prompts_loggable()
        fields = {}
        for key, value in extra_fields(record).items():
            if key in PROMPT_FIELDS and not show_prompts:
                continue
            fields[key] = value if _is_short_scalar(value) else _clip(repr(value))
        error = record.exc_text or (
            logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        )
        if error:
            fields["error"] = _clip(error.strip().splitlines()[-1])
        return {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": _clip(record.getMessage()),
            "fields": fields,
        }

    def lines(self) -> list[dict[str, Any]]:
        with self._lines_lock:
            return list(self._lines)


def _is_short_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= LOG_TEXT_MAX
    return value is None or isinstance(value, bool | int | float)


def _clip(text: str) -> str:
    return text if len(text) <= LOG_TEXT_MAX else text[: LOG_TEXT_MAX - 1] + "\u2026"


# ---------------------------------------------------------------------------
# Latency samples


class LatencySampler:
    """A ring buffer of (time, p50, p99, calls) taken every few seconds.

    Metrics keeps the durations of the last ten minutes but answers only
    "the last N seconds from now"; sampling it on a clock gives the chart its
    past, whether or not a page was open.
    """

    def __init__(
        self,
        metrics: Any,
        *,
        interval_s: float = SAMPLE_INTERVAL_S,
        window_s: float = SAMPLE_WINDOW_S,
        kept: int = SAMPLES_KEPT,
    ) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=kept)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.metrics is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="console-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:
                log.debug("console: latency sample failed", exc_info=True)
            if self._stopping.wait(self.interval_s):
                return

    def sample(self) -> None:
        figures = self.metrics.latency_percentiles(self.window_s)
        with self._lock:
            self._samples.append(
                {
                    "time": round(time.time(), 3),
                    "p50": figures.get("p50"),
                    "p99": figures.get("p99"),
                    "count": figures.get("count", 0),
                }
            )

    def samples(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._samples)


# ---------------------------------------------------------------------------
# Iteration history


class HistoryTail:
    """The last records of one task's history.jsonl, read again only when it changes."""

    def __init__(self, path: Path, *, records: int = HISTORY_RECORDS) -> None:
        self.path = path
        self.records = records
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._cached: list[dict[str, Any]] | None = None

    def read(self) -> list[dict[str, Any]] | None:
        """The last iterations, oldest first; None when the file does not exist."""
        try:
            stat = self.path.stat()
        except OSError:
            return None
        key = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key == self._seen and self._cached is not None:
                return self._cached
            try:
                records = self._read_tail(stat.st_size)
            except OSError:
                return None
            self._seen, self._cached = key, records
            return records

    def _read_tail(self, size: int) -> list[dict[str, Any]]:
        with open(self.path, "rb") as stream:
            start = max(0, size - HISTORY_TAIL_BYTES)
            stream.seek(start)
            data = stream.read(HISTORY_TAIL_BYTES)
        lines = data.splitlines()
        if start > 0 and lines:
            lines = lines[1:]  # the first line was cut by the seek

        records: list[dict[str, Any]] = []
        for raw in reversed(lines):
            if len(records) >= self.records:
                break
            try:
                record = json.loads(raw)
            except ValueError:
                # A line being written, or a damaged one: skip it.
                continue
            if isinstance(record, dict):
                records.append(_iteration_record(record))
        records.reverse()
        return records


def _iteration_record(record: dict[str, Any]) -> dict[str, Any]:
    """The fields the chart draws, whatever spelling the writer used."""
    lines: dict[str, Any] = next(
        (record[key] for key in ("lines", "change") if isinstance(record.get(key), dict)), {}
    )

    def first(*values: Any) -> Any:
        return next((value for value in values if value is not None), None)

    return {
        "number": first(record.get("number"), record.get("iteration")),
        "duration_s": _number(first(record.get("duration_s"), record.get("duration"))),
        "outcome": first(record.get("outcome"), record.get("status")),
        "lines_added": _number(
            first(record.get("lines_added"), record.get("added"), lines.get("added"))
        ),
        "lines_removed": _number(
            first(record.get("lines_removed"), record.get("removed"), lines.get("removed"))
        ),
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


# ---------------------------------------------------------------------------
# The console


class BadAction(Exception):
    """A request the console cannot act on: answered 400 with the message."""


@dataclass
class ConsoleSources:
    """What the console reads and acts on; the service provides each of them.

    supervisor returns None until the workers are up (and no action but
    reading is possible until then). stop asks for the drain SIGTERM starts.
    """

    snapshot: Callable[[], dict[str, Any]]
    supervisor: Callable[[], Any]
    loops: Callable[[], list[Any]]
    metrics: Any
    stop: Callable[[], None]


class Console:
    """The page, /api/state and /api/action on a HealthServer."""

    def __init__(
        self,
        sources: ConsoleSources,
        *,
        token: str,
        token_file: Path | None,
        host: str,
    ) -> None:
        self.sources = sources
        self.token = token
        self.token_file = token_file
        self.read_needs_token = not is_loopback(host)
        self.sampler = LatencySampler(sources.metrics)
        self.log_tail = LogTail()
        self._histories: dict[Path, HistoryTail] = {}
        self._page, self._page_policy = _load_page()

    @classmethod
    def for_service(
        cls,
        sources: ConsoleSources,
        *,
        monitoring: Any,
        state_dir: Path,
    ) -> Console:
        """Build the console of a `start` run: its token, and where it listens."""
        token, token_file = resolve_token(monitoring.console_token, state_dir)
        return cls(
            sources,
            token=token,
            token_file=token_file,
            host=monitoring.health_check_host,
        )

    def install(self, server: HealthServer) -> None:
        """Add the routes, start keeping log lines and latency samples."""
        logging.getLogger(NAMESPACE).addHandler(self.log_tail)
        self.sampler.start()
        server.add_route("GET", "/", self._get_page)
        server.add_route("GET", "/api/state", self._get_state)
        server.add_route("POST", "/api/action", self._post_action)

        where = self.token_file if self.token_file is not None else "monitoring.console_token"
        log.info(
            "console at %s/ (%s need the token in %s)",
            server.url,
            "reading and actions" if self.read_needs_token else "actions",
            where,
            extra={"url": f"{server.url}/"},
        )

    def close(self) -> None:
        """Stop sampling, drop the log handler, remove the token file we wrote."""
        self.sampler.stop()
        logging.getLogger(NAMESPACE).removeHandler(self.log_tail)
        if self.token_file is not None:
            with contextlib.suppress(OSError):
                self.token_file.unlink()

    # -- access -------------------------------------------------------------

    def _supplied_token(self, request: Request, *, from_query: bool) -> str | None:
        match = _BEARER.match(request.headers.get("Authorization", "") or "")
        if match:
            return match.group(1)
        if from_query:
            values = request.query.get("token") or []
            return values[0] if values else None
        return None

    def _has_token(self, request: Request, *, from_query: bool) -> bool:
        supplied = self._supplied_token(request, from_query=from_query)
        if supplied is None:
            return False
        return hmac.compare_digest(supplied.encode("utf-8"), self.token.encode("utf-8"))

    def _refuse_reading(self, request: Request) -> str | None:
        """Why this request may not read the console, or None when it may."""
        if self._has_token(request, from_query=True):
            return None
        if self.read_needs_token:
            return "reading the console needs its token"
        # Loopback without a token: only for a Host that names loopback.
        host = request.headers.get("Host")
        if host is None or is_loopback(_host_name(host)):
            return None
        return (
            f"the Host {host!r} is not a loopback name: open the console as 127.0.0.1 "
            "or localhost, or give the token"
        )

    # -- routes -------------------------------------------------------------

    def _get_page(self, request: Request) -> Response:
        refusal = self._refuse_reading(request)
        if refusal is not None:
            return _token_page(refusal)
        headers = {
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": self._page_policy,
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
        }
        return 200, headers, self._page

    def _get_state(self, request: Request) -> Response:
        refusal = self._refuse_reading(request)
        if refusal is not None:
            return json_response(HTTPStatus.FORBIDDEN, {"error": refusal})
        return json_response(200, self.state())

    def _post_action(self, request: Request) -> Response:
        if not self._has_token(request, from_query=False):
            return json_response(
                HTTPStatus.FORBIDDEN,
                {"error": "actions need the console token (Authorization: Bearer TOKEN)"},
            )
        try:
            payload = _parse_action(request.body)
            result = self._act(payload, request.client)
        except BadAction as error:
            return json_response(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except _NotReady as error:
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(error)})
        return json_response(200, {"ok": True} | result)

    # -- actions ------------------------------------------------------------

    def _act(self, payload: dict[str, Any], client: str) -> dict[str, Any]:
        action = payload["action"]
        supervisor = self.sources.supervisor()
        if supervisor is None:
            raise _NotReady("the workers are not up yet; try again in a moment")

        if action == "stop":
            log.info("console: stop requested by %s", client, extra={"client": client})
            self.sources.stop()
            return {"action": action, "message": "stopping: draining the calls in flight"}

        if action == "reload":
            log.info("console: reload requested by %s", client, extra={"client": client})
            supervisor.reload()
            return {"action": action, "message": "reloading the configuration"}

        if action == "restart_worker":
            slot = payload["slot"]
            if not supervisor.restart_worker(slot):
                raise BadAction(f"no worker in slot {slot}")
            log.info(
                "console: restart of the worker in slot %d requested by %s",
                slot,
                client,
                extra={"client": client, "slot": slot},
            )
            return {"action": action, "slot": slot, "message": f"restarting worker {slot}"}

        # close_breaker: _parse_action admits no other.
        name = payload["agent"]
        guard = supervisor.agents.guard_named(name)
        if guard is None:
            known = ", ".join(g.name for g in supervisor.agents.guards)
            raise BadAction(f"no agent named {name!r} (agents: {known})")
        log.warning(
            "console: breaker of agent %s closed by hand by %s",
            name,
            client,
            extra={"client": client, "agent": name},
        )
        guard.breaker.force_close()
        return {
            "action": action,
            "agent": name,
            "state": guard.breaker.state,
            "message": f"closed the breaker of {name}",
        }

    # -- the state ----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything the page shows, in one JSON document."""
        now = time.time()
        health = self.sources.snapshot()
        supervisor = self.sources.supervisor()
        stats = supervisor.stats() if supervisor is not None else None
        agents = [_agent(entry, now) for entry in stats["agents"]] if stats else []

        return {
            "time": round(now, 3),
            "status": health.get("status", "unhealthy"),
            "reasons": list(health.get("reasons") or []),
            "adapter": health.get("adapter"),
            "version": health.get("version"),
            "pid": health.get("pid"),
            "uptime_s": health.get("uptime_s"),
            "workers": health.get("workers", []),
            "workers_alive": health.get("workers_alive", 0),
            "worker_restarts": health.get("worker_restarts", 0),
            "agents": agents,
            "queue": health.get("queue", {"queued": 0, "in_flight": 0}),
            "requests": health.get("requests", {}),
            "loops": [self._loop(loop) for loop in self.sources.loops()],
            "latency": {
                "interval_s": self.sampler.interval_s,
                "window_s": self.sampler.window_s,
                "samples": self.sampler.samples(),
            },
            "log": self.log_tail.lines(),
            "console": {
                "read_needs_token": self.read_needs_token,
                "prompts_shown": prompts_loggable(),
            },
        }

    def _loop(self, loop: Any) -> dict[str, Any]:
        progress = dict(loop.progress())
        path = Path(loop.task.state_dir) / HISTORY_FILE_NAME
        history = self._histories.get(path)
        if history is None:
            history = self._histories.setdefault(path, HistoryTail(path))
        progress["history"] = history.read()
        return progress


class _NotReady(Exception):
    """An action before the workers are up: 503, try again."""


def _parse_action(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadAction('the body must be a JSON object, e.g. {"action": "reload"}') from None
    if not isinstance(payload, dict):
        raise BadAction('the body must be a JSON object, e.g. {"action": "reload"}')
    action = payload.get("action")
    if action not in ACTIONS:
        raise BadAction(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")

    if action == "restart_worker":
        slot = payload.get("slot")
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise BadAction("restart_worker needs slot: a worker's slot number")
    if action == "close_breaker" and not isinstance(payload.get("agent"), str):
        raise BadAction("close_breaker needs agent: an agent's name")
    return payload


def _agent(entry: dict[str, Any], now: float) -> dict[str, Any]:
    breaker = dict(entry.get("breaker") or {})
    retry_at = breaker.get("retry_at")
    # The server's clock says when, so the page need not trust its own.
    retry_in = None if retry_at is None else round(max(0.0, float(retry_at) - now), 1)
    return entry | {"breaker": breaker, "retry_in_s": retry_in}


# ---------------------------------------------------------------------------
# The page


def _load_page() -> tuple[bytes, str]:
    """The page's bytes, and a Content-Security-Policy that admits only its own code.

    The script and the style are inline (one file, nothing to fetch); their
    hashes in the policy let them run and nothing injected beside them.
    """
    page = resources.files("ralph_supervisor").joinpath(PAGE_RESOURCE).read_bytes()
    text = page.decode("utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", text, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", text, re.DOTALL)
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(_csp_hash(source) for source in scripts),
            "style-src " + " ".join(_csp_hash(source) for source in styles),
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return page, policy


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


_TOKEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ralph-supervisor console</title>
<link rel="icon" href="data:,"></head>
<body>
<h1>ralph-supervisor console</h1>
<p>{reason}.</p>
<p>The token is <code>monitoring.console_token</code>, or the file
<code>STATE_DIR/console.token</code> on the host.</p>
<form method="get" action="/">
<label>Console token <input name="token" type="password" autocomplete="off" autofocus></label>
<button type="submit">Open</button>
</form>
</body></html>
"""


def _token_page(reason: str) -> Response:
    """A 403 with a form that asks for the token (the page itself takes it from ?token=)."""
    headers = {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": "default-src 'none'; form-action 'self'; "
        "frame-ancestors 'none'",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }
    body = _TOKEN_PAGE.format(reason=html.escape(reason[:1].upper() + reason[1:]))
    return HTTPStatus.FORBIDDEN, headers, body.encode("utf-8")


def token_from_file(state_dir: Path) -> str | None:
    """The token `start` wrote to STATE_DIR/console.token, or None."""
    try:
        return (state_dir / TOKEN_FILE_NAME).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None
