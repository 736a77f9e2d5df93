"""Diagnostics: the SIGUSR1 dump and systemd notifications.

SystemdNotifier speaks the sd_notify protocol (one datagram of NAME=value
lines to the AF_UNIX socket named by NOTIFY_SOCKET) without libsystemd, so a
unit with Type=notify and WatchdogSec= works with no extra dependency.

write_dump() is what `kill -USR1 <pid>` produces. The signal handler only
records the signal; the supervisor loop calls write_dump() with its
snapshot. The dump holds the snapshot, the stack of every thread of this
process and, where py-spy is installed, the Python stacks of the workers.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PY_SPY_TIMEOUT_S = 5.0

PY_SPY_MISSING = (
    "py-spy is not installed, so worker stacks are not shown; "
    "install it with: pip install 'ralph-supervisor[diagnostics]'"
)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Return how often to send WATCHDOG=1, in seconds, or None for never.

    Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises, and only when
    WATCHDOG_PID is unset or names this process (the variables are inherited
    by children, which must not think the watchdog is theirs).
    """
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID", "").strip()
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "").strip())
    except ValueError:
        return None
    return usec / 1e6 / 2 if usec > 0 else None


class SystemdNotifier:
    """Sends sd_notify messages. Never raises: a lost message logs once."""

    def __init__(self, address: str) -> None:
        self.address = address
        # "@name" is an abstract socket: its real name starts with a NUL byte.
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self._failed = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        """Return a notifier for NOTIFY_SOCKET, or None when it is unset."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        if not address.startswith(("/", "@")):
            # systemd 254 also offers vsock: addresses, for VMs; not here.
            log.debug("NOTIFY_SOCKET is not a unix socket, ignored", extra={"socket": address})
            return None
        return cls(address)

    def notify(self, message: str) -> bool:
        """Send one message ("READY=1", or several lines); return whether it went."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Non-blocking: a systemd that does not read its queue must
                # not stall the supervisor loop.
                sock.setblocking(False)
                sock.sendto(message.encode("utf-8"), self._target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.debug(
                    "systemd notification failed; later failures are not logged",
                    extra={"socket": self.address, "error_type": type(exc).__name__},
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(_with_status("READY=1", status))

    def reloading(self) -> bool:
        # Type=notify-reload wants the monotonic time of the reload with it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(_with_status("STOPPING=1", status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(_with_status("", text))

    def watchdog_interval(self) -> float | None:
        return watchdog_interval()


def _with_status(message: str, status: str | None) -> str:
    if not status:
        return message
    # A newline would start a new assignment in the datagram.
    line = "STATUS=" + " ".join(status.splitlines())
    return f"{message}\n{line}" if message else line


def format_thread_stacks() -> str:
    """Return the current stack of every thread in this process."""
    names = {thread.ident: thread for thread in threading.enumerate()}
    sections = []
    for ident, frame in sys._current_frames().items():
        thread = names.get(ident)
        name = thread.name if thread else "?"
        daemon = f", daemon={thread.daemon}" if thread else ""
        stack = "".join(traceback.format_stack(frame))
        sections.append(f"--- thread {name} (ident={ident}{daemon}) ---\n{stack}")
    return "\n".join(sections)


def _py_spy_dumps(pids: list[int], timeout: float) -> str:
    """Run py-spy on every worker at once, within one deadline."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return PY_SPY_MISSING + "\n"
    if not pids:
        return "no worker pids\n"

    deadline = time.monotonic() + timeout
    running: list[tuple[int, subprocess.Popen[str] | None, str]] = []
    for pid in pids:
        try:
            spy = subprocess.Popen(
                [py_spy, "dump", "--pid", str(pid)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except OSError as exc:
            running.append((pid, None, f"cannot run py-spy: {exc}\n"))
            continue
        running.append((pid, spy, ""))

    sections = []
    for pid, child, text in running:
        if child is not None:
            try:
                output, _ = child.communicate(timeout=max(0.0, deadline - time.monotonic()))
                text = output or f"py-spy exited {child.returncode} with no output\n"
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                text = f"py-spy did not finish within {timeout:g} s\n"
        sections.append(f"--- worker pid {pid} ---\n{text}")
    return "\n".join(sections)


def _worker_pids(snapshot: Mapping[str, Any]) -> list[int]:
    pids = []
    for worker in snapshot.get("workers") or []:
        pid = worker.get("pid") if isinstance(worker, Mapping) else None
        if isinstance(pid, int) and pid > 0:
            pids.append(pid)
    return pids


def _format_workers(workers: Iterable[Any]) -> str:
    columns = ("id", "pid", "state", "request_id", "prompt_sha", "age_s", "restarts")
    rows: list[tuple[str, ...]] = [columns]
    for worker in workers:
        if isinstance(worker, Mapping):
            rows.append(tuple(_cell(worker.get(column)) for column in columns))
    if len(rows) == 1:
        return "no workers\n"
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render_dump(
    snapshot: Mapping[str, Any],
    *,
    worker_pids: Iterable[int] | None = None,
    py_spy_timeout: float = PY_SPY_TIMEOUT_S,
) -> str:
    """Return the text of a diagnostic dump (what write_dump() writes)."""
    pids = list(worker_pids) if worker_pids is not None else _worker_pids(snapshot)
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    reasons = "; ".join(str(reason) for reason in snapshot.get("reasons") or []) or "-"
    parts = [
        "ralph-supervisor diagnostic dump\n",
        f"time: {now}\n",
        f"pid: {os.getpid()}\n",
        f"python: {platform.python_version()} ({sys.executable})\n",
        f"argv: {' '.join(sys.argv)}\n",
        f"status: {snapshot.get('status', '-')} (reasons: {reasons})\n",
        "\n== workers ==\n",
        _format_workers(snapshot.get("workers") or []),
        "\n== queue ==\n",
        json.dumps(snapshot.get("queue"), indent=2, default=str) + "\n",
        "\n== snapshot ==\n",
        json.dumps(snapshot, indent=2, default=str, sort_keys=True) + "\n",
        f"\n== threads of pid {os.getpid()} ==\n",
        format_thread_stacks(),
        "\n== worker stacks (py-spy) ==\n",
        _py_spy_dumps(pids, py_spy_timeout),
    ]
    return "".join(parts)


def write_dump(
    snapshot: Mapping[str, Any],
    state_dir: Path,
    *,
    worker_pids: Iterable[int] | None = None,
    py_spy_timeout: float = PY_SPY_TIMEOUT_S,
) -> Path:
    """Write STATE_DIR/diagnostics/dump-<UTC time>-<pid>.txt (mode 0600).

    Worker pids default to those in snapshot["workers"]. py-spy runs on all of
    them at once, for at most py_spy_timeout in total: call this from a
    thread if the caller must not stall that long.
    """
    started = time.monotonic()
    text = render_dump(snapshot, worker_pids=worker_pids, py_spy_timeout=py_spy_timeout)

    directory = Path(state_dir) / "diagnostics"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
    path, fd = _create_private(directory, f"dump-{stamp}-{os.getpid()}")
    with open(fd, "w", encoding="utf-8") as file:
        file.write(text)

    log.info(
        "diagnostic dump written",
        extra={
            "path": str(path),
            "threads": len(sys._current_frames()),
            "workers": len(snapshot.get("workers") or []),
            "py_spy": shutil.which("py-spy") is not None,
            "duration_s": round(time.monotonic() - started, 3),
        },
    )
    return path


def _create_private(directory: Path, stem: str) -> tuple[Path, int]:
    # O_EXCL with mode 0600: the dump holds request ids and state, and must
    # never be readable by others, even for the moment before a chmod.
    for attempt in range(100):
        path = directory / (f"{stem}.txt" if attempt == 0 else f"{stem}-{attempt}.txt")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.fchmod(fd, 0o600)
        return path, fd
    raise FileExistsError(f"cannot create a unique dump file in {directory}")
