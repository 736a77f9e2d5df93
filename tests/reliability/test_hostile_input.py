"""Hostile input: prompts, configuration files and HTTP requests.

Whatever arrives, the product answers with one of its documented outcomes and
nothing else: no traceback, no stray exception type, no process or thread
left behind (the autouse leak check of tests/conftest.py covers processes).

- Prompts through QChatAdapter to the simulator with echo=sha256: the agent
  received exactly the prompt as validated (NUL characters removed), or the
  call raised PromptRejected for a reason that applies.
- Configuration files through load_config and `config validate`: a Config or
  ConfigError; exit 0 or 2. A billion-laughs file fails fast in little memory.
- HTTP to a real HealthServer on port 0: a JSON answer with a documented
  status for every request, /health answering while slow clients hang on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ralph_supervisor.adapter import QChatAdapter
from ralph_supervisor.config import Config, load_config
from ralph_supervisor.errors import ConfigError, PromptRejected
from ralph_supervisor.server import HealthServer

from .conftest import sizes

MAX_PROMPT = 1024 * 1024

FRAGMENTS = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "; rm -rf .",
    "&& echo hi",
    "| cat /etc/passwd",
    "> out.txt",
    "'\"\\",
    "${HOME}",
    "*",
    "~",
    "\x1b[31m",
    "\x1b[2J\x1b[H",
    "\x1b]0;title\x07",
    "\x9b6n",
    "\0",
    "\r\n",
    "\t",
    "\x7f",
    "\ud800",
    "\udfff",
    "🚀",
    "héllo",
    "\u202e",
    "\ufeff",
]

SLOW = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]


def prompts() -> st.SearchStrategy[str]:
    """Text with hostile pieces: any code point (surrogates too), shell
    metacharacters, ANSI sequences, control characters and NUL."""
    pieces = st.one_of(
        st.sampled_from(FRAGMENTS),
        st.text(st.characters(exclude_categories=()), max_size=40),
        st.text(st.characters(max_codepoint=0x1F), max_size=10),
    )
    return st.lists(pieces, min_size=1, max_size=12).map("".join)


def expected_rejection(prompt: str) -> str | None:
    """Why PromptPolicy may refuse this prompt, or None if it must not."""
    try:
        encoded = prompt.encode("utf-8")
    except UnicodeEncodeError:
        return "lone surrogate"
    if not prompt.replace("\0", "").strip():
        return "empty"
    if len(encoded) > MAX_PROMPT:
        return "too long"
    return None


def check_prompt(adapter: QChatAdapter, prompt: str) -> str:
    """Run one prompt; return 'ok' or 'rejected', or fail the test."""
    reason = expected_rejection(prompt)
    try:
        response = adapter.execute(prompt)
    except PromptRejected:
        assert reason is not None, f"rejected without cause: {prompt[:200]!r}"
        return "rejected"

    assert reason is None, f"accepted although {reason}: {prompt[:200]!r}"
    sent = prompt.replace("\0", "").encode("utf-8")
    expected = f"sha256:{hashlib.sha256(sent).hexdigest()} bytes:{len(sent)}"
    assert response.text.strip() == expected, f"prompt {prompt[:200]!r} arrived changed"
    return "ok"


@pytest.fixture
def echo_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> QChatAdapter:
    # The adapter runs the agent from this process, so the environment reaches it.
    monkeypatch.setenv("QCHAT_SIM_ECHO", "sha256")
    monkeypatch.setenv("QCHAT_SIM_CHATTER", "0")
    config = make_config(tmp_path, adapter__max_retries=0, adapter__timeout=30)
    return QChatAdapter(config)


@pytest.mark.parametrize("examples", sizes(40, 400, bounded_timeout=120, full_timeout=900))
def test_hostile_prompts_arrive_intact_or_are_rejected(
    echo_adapter: QChatAdapter, examples: int, report
) -> None:
    tally = {"ok": 0, "rejected": 0}

    @settings(max_examples=examples, deadline=None, suppress_health_check=SLOW, database=None)
    @given(prompt=prompts())
    def run(prompt: str) -> None:
        tally[check_prompt(echo_adapter, prompt)] += 1

    run()
    report("hostile_prompts", examples=examples, **tally, other=0)


@pytest.mark.parametrize("size", sizes(1, 1, bounded_timeout=120, full_timeout=120))
def test_large_and_degenerate_prompts(echo_adapter: QChatAdapter, size: int, report) -> None:
    cases = {
        "2 MiB": "x" * (2 * 1024 * 1024),
        "1 MiB + 1 byte": "y" * (MAX_PROMPT + 1),
        "1 MiB exactly, on stdin": "z" * MAX_PROMPT,
        "200 KiB with metacharacters, on stdin": "$(touch PWNED); " * 13_000,
        "128 KiB of multibyte text": "é🚀" * 21_000,
        "only NUL": "\0\0\0",
        "NUL inside": "before\0after",
        "lone surrogate": "abc\ud800def",
        "whitespace": " \t\r\n ",
        "ANSI only": "\x1b[31m\x1b[0m",
        "control characters": "".join(chr(c) for c in range(1, 32)),
        "a word that is a flag after a space": " --trust-all-tools",
        "the subcommand's name": "chat",
        "a lone dash": "-",
    }
    outcomes = {name: check_prompt(echo_adapter, prompt) for name, prompt in cases.items()}
    report(
        "hostile_prompts_fixed",
        cases=len(cases),
        ok=sum(1 for o in outcomes.values() if o == "ok"),
        rejected=sorted(name for name, o in outcomes.items() if o == "rejected"),
    )


@pytest.mark.parametrize("prompt", ["-x hello", "--help me", "--model gpt -- please"])
def test_a_prompt_that_starts_with_a_dash_arrives_intact(
    echo_adapter: QChatAdapter, prompt: str
) -> None:
    check_prompt(echo_adapter, prompt)


# -- configuration files -----------------------------------------------------

KNOWN_KEYS = [
    ("adapter", "timeout"),
    ("adapter", "command"),
    ("adapter", "max_retries"),
    ("performance", "max_concurrent"),
    ("resources", "max_memory_mb"),
    ("logging", "level"),
    ("logging", "file"),
    ("monitoring", "health_check_port"),
    ("breaker", "fail_max"),
    ("cache", "size_limit"),
    ("supervisor", "drain_timeout"),
    ("loop", "max_iterations"),
    ("state", "dir"),
]

yaml_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=30),
        st.sampled_from(["ten", "1e999", "0x7fffffff", "-1", "", "~", "yes", "null"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def config_documents(draw: Any) -> str:
    document: dict[Any, Any] = {}
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            section, key = draw(st.sampled_from(KNOWN_KEYS))
        else:
            section = draw(st.sampled_from([k for k, _ in KNOWN_KEYS] + ["bogus", "Adapter"]))
            key = draw(st.text(min_size=1, max_size=12))
        document.setdefault(section, {})
        if isinstance(document[section], dict):
            document[section][key] = draw(yaml_values)
    if draw(st.integers(0, 9)) == 0:
        document[draw(st.text(max_size=10))] = draw(yaml_values)
    text = yaml.safe_dump(document, allow_unicode=True)
    # Sometimes a damaged document: cut, or with a stray character.
    cut = draw(st.integers(0, 20))
    if cut == 0 and text:
        text = text[: draw(st.integers(0, len(text)))]
    elif cut == 1:
        text += draw(st.sampled_from(["\t", ":", "- [", "&a", "*a", "!!python/none", "\0"]))
    return text


def load_file(path: Path) -> str:
    try:
        config = load_config(path, env={})
    except ConfigError:
        return "config_error"
    assert isinstance(config, Config)
    return "ok"


@pytest.mark.parametrize("examples", sizes(150, 1500, bounded_timeout=120, full_timeout=600))
def test_any_config_file_loads_or_raises_config_error(
    tmp_path: Path, examples: int, report
) -> None:
    tally = {"ok": 0, "config_error": 0}
    path = tmp_path / "config.yaml"

    @settings(max_examples=examples, deadline=None, suppress_health_check=SLOW, database=None)
    @given(text=config_documents())
    def run(text: str) -> None:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        tally[load_file(path)] += 1

    run()
    report("hostile_config_load", examples=examples, **tally, other=0)


# `python -m ralph_supervisor config validate FILE`, then the peak resident
# size of the interpreter's own address space (VmHWM). ru_maxrss would count
# the copy of pytest that the child was until its exec.
MEASURED_VALIDATE = """
import runpy, sys
sys.argv = ["ralph-supervisor", "config", "validate", sys.argv[1]]
try:
    runpy.run_module("ralph_supervisor", run_name="__main__", alter_sys=True)
finally:
    peak = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    sys.stderr.write("\\nvmhwm_kib=" + peak + "\\n")
"""


def run_validate(
    path: Path, *, memory_limit: int | None = None, measure: bool = False
) -> tuple[int, str, float, int | None]:
    """Run `config validate`: exit status, output, seconds, peak KiB (if measured)."""

    def limit() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    if measure:
        command = [sys.executable, "-c", MEASURED_VALIDATE, str(path)]
    else:
        command = [sys.executable, "-m", "ralph_supervisor", "config", "validate", str(path)]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=limit,
        start_new_session=True,
    )
    try:
        raw, _ = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(10)
    seconds = time.monotonic() - started
    output = raw.decode("utf-8", "replace")
    peak = None
    if measure:
        output, _, tail = output.rpartition("\nvmhwm_kib=")
        peak = int(tail.split()[0])
    return process.returncode, output, seconds, peak


@pytest.mark.parametrize("examples", sizes(8, 60, bounded_timeout=120, full_timeout=600))
def test_config_validate_exits_0_or_2_without_traceback(
    tmp_path: Path, examples: int, report
) -> None:
    tally = {0: 0, 2: 0}
    path = tmp_path / "config.yaml"

    @settings(max_examples=examples, deadline=None, suppress_health_check=SLOW, database=None)
    @given(text=config_documents())
    def run(text: str) -> None:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        code, output, _, _ = run_validate(path)
        assert code in (0, 2), output
        assert "Traceback" not in output, output
        assert code == (0 if load_file(path) == "ok" else 2)
        tally[code] += 1

    run()
    report("hostile_config_cli", examples=examples, exit_0=tally[0], exit_2=tally[2], other=0)


def billion_laughs(levels: int = 9) -> str:
    lines = ['lol: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        refs = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(f"l{level}: &l{level} [{refs}]")
    return "\n".join(lines) + "\n"


BOMBS = {
    "billion laughs": billion_laughs(),
    "laughs inside a real key": "adapter:\n  command: &c [a, b]\n  failure_patterns:\n"
    "    throttled: [*c, *c, *c]\n",
    "merge keys": "base: &b {timeout: 1}\nadapter:\n  <<: *b\n",
    "aliased section": "adapter: &a {timeout: 5}\nperformance: *a\n",
}


@pytest.mark.parametrize("size", sizes(1, 1, bounded_timeout=60, full_timeout=60))
@pytest.mark.parametrize("name", list(BOMBS))
def test_yaml_alias_bombs_fail_fast_in_bounded_memory(
    tmp_path: Path, name: str, size: int, report
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS[name])

    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match="alias"):
            load_config(path, env={})
        seconds = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # The CLI, in a child whose address space is capped at 1 GiB.
    code, output, cli_seconds, peak_kib = run_validate(path, memory_limit=2**30, measure=True)
    assert peak_kib is not None
    report(
        "yaml_bomb",
        file=name.replace(" ", "_"),
        load_s=round(seconds, 3),
        load_peak_kib=peak // 1024,
        cli_exit=code,
        cli_s=round(cli_seconds, 2),
        cli_peak_rss_mib=round(peak_kib / 1024, 1),
    )
    assert seconds < 1.0
    assert peak < 10 * 2**20
    assert code == 2, output
    assert "Traceback" not in output
    assert cli_seconds < 10
    assert peak_kib < 100 * 1024


# -- HTTP ----------------------------------------------------------------------

DOCUMENTED_STATUSES = {200, 400, 404, 405, 408, 413, 414, 431, 503, 505}


def snapshot() -> dict[str, Any]:
    return {"status": "healthy", "reasons": [], "adapter": "sim", "version": "test"}


@pytest.fixture
def health_server(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level("DEBUG", logger="ralph_supervisor")
    threads_before = set(threading.enumerate())
    server = HealthServer("127.0.0.1", 0, snapshot=snapshot, metrics=None, connection_timeout=2)
    server.start()
    yield server
    assert server.stop(timeout=10), "the health server left threads running"
    left = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not left, f"threads left behind: {left}"
    problems = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not problems, [r.getMessage() for r in problems]
    assert not any("Traceback" in r.getMessage() for r in caplog.records)


def exchange(server: HealthServer, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(server.address, timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int | None:
    """The status of an HTTP answer; None for an empty one (a closed socket)."""
    if not answer:
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    assert status_line[0] in (b"HTTP/1.0", b"HTTP/1.1"), answer[:200]
    status = int(status_line[1])
    assert b"Traceback" not in answer
    assert b"<html" not in answer.lower(), "an HTML error page, not JSON"
    if body:
        assert body.lstrip().startswith(b"{"), answer[:300]
    return status


def health_is_quick(server: HealthServer, within: float = 1.0) -> float:
    started = time.monotonic()
    answer = exchange(server, b"GET /health HTTP/1.0\r\n\r\n", timeout=within + 2)
    took = time.monotonic() - started
    assert status_of(answer) == 200
    assert took < within, f"/health took {took:.2f} s"
    return took


http_methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PRI", "get"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
)
http_paths = st.one_of(
    st.sampled_from(["/health", "/health/detailed", "/metrics", "*", "//", "/../etc/passwd"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=0x10FFFF), max_size=60).map(
        lambda s: "/" + s
    ),
)
http_versions = st.sampled_from(
    ["HTTP/0.9", "HTTP/1.0", "HTTP/1.1", "HTTP/2.0", "HTTP/3", "FOO", ""]
)
raw_garbage = st.binary(max_size=300)


@st.composite
def http_requests(draw: Any) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(raw_garbage)
    line = " ".join([draw(http_methods), draw(http_paths), draw(http_versions)])
    headers = draw(
        st.lists(
            st.sampled_from(
                [
                    "Content-Length: -1",
                    "Content-Length: 99999999999",
                    "Content-Length: ten",
                    "Content-Length: 3",
                    "Host: x",
                    "Transfer-Encoding: chunked",
                    "Expect: 100-continue",
                    ": no name",
                    "X" * 70_000 + ": long",
                ]
            ),
            max_size=3,
        )
    )
    body = draw(st.sampled_from([b"", b"abc", b"{}"]))
    return ("\r\n".join([line, *headers]) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body


@pytest.mark.parametrize("examples", sizes(150, 1500, bounded_timeout=120, full_timeout=600))
def test_any_http_request_gets_a_documented_answer(
    health_server: HealthServer, examples: int, report
) -> None:
    seen: dict[Any, int] = {}

    @settings(max_examples=examples, deadline=None, suppress_health_check=SLOW, database=None)
    @given(data=http_requests())
    def run(data: bytes) -> None:
        status = status_of(exchange(health_server, data))
        assert status is None or status in DOCUMENTED_STATUSES, status
        seen[status] = seen.get(status, 0) + 1

    run()
    took = health_is_quick(health_server)
    report(
        "hostile_http",
        examples=examples,
        statuses=dict(sorted(seen.items(), key=lambda item: str(item[0]))),
        health_after_s=round(took, 3),
    )


@pytest.mark.parametrize("size", sizes(1, 1, bounded_timeout=60, full_timeout=60))
def test_named_hostile_requests(health_server: HealthServer, size: int, report) -> None:
    cases = {
        "long path": (b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n", {414}),
        "long path under the line limit": (b"GET /" + b"a" * 60_000 + b" HTTP/1.0\r\n\r\n", {404}),
        "bad method": (b"BREW /health HTTP/1.0\r\n\r\n", {405}),
        "post to health": (b"POST /health HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", {405}),
        "garbage line": (b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n", {400}),
        "no version": (b"GET /health\r\n\r\n", {200}),
        "one word": (b"HELLO\r\n\r\n", {400}),
        "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {505}),
        "negative length": (b"POST /x HTTP/1.0\r\nContent-Length: -5\r\n\r\n", {413}),
        "bad length": (b"POST /x HTTP/1.0\r\nContent-Length: ten\r\n\r\n", {400}),
        "huge length": (b"POST /x HTTP/1.0\r\nContent-Length: 9999999999\r\n\r\n", {413}),
        "too many headers": (b"GET /health HTTP/1.0\r\n" + b"X: y\r\n" * 200 + b"\r\n", {431}),
        "traversal": (b"GET /../../etc/passwd HTTP/1.0\r\n\r\n", {404}),
        "empty": (b"", {None}),
    }
    statuses = {}
    for name, (data, allowed) in cases.items():
        status = status_of(exchange(health_server, data))
        statuses[name] = status
        assert status in allowed, (name, status)
    report("hostile_http_named", cases=len(cases), statuses=statuses)


@pytest.mark.parametrize("path", ["/health", "/nowhere"])
def test_an_explicit_http_0_9_request_gets_a_status_line(
    health_server: HealthServer, path: str
) -> None:
    answer = exchange(health_server, f"GET {path} HTTP/0.9\r\n\r\n".encode())
    assert status_of(answer) in DOCUMENTED_STATUSES


@pytest.mark.parametrize("clients", sizes(30, 60, bounded_timeout=60, full_timeout=120))
def test_slow_clients_do_not_block_health(health_server: HealthServer, clients: int, report):
    """Clients that send half a request and stall: /health
    still answers at once, and every slow socket is dropped in time."""
    slow: list[socket.socket] = []
    try:
        for index in range(clients):
            sock = socket.create_connection(health_server.address, timeout=5)
            partial = b"GET /health HTTP/1.1\r\nHost: x\r\n" if index % 2 else b"GE"
            sock.sendall(partial)
            slow.append(sock)
        times = [health_is_quick(health_server) for _ in range(5)]

        # The server drops silent clients after connection_timeout (2 s here).
        dropped = 0
        deadline = time.monotonic() + 10
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
                dropped += 1
    finally:
        for sock in slow:
            sock.close()
    report(
        "slow_clients",
        clients=clients,
        health_max_s=round(max(times), 3),
        dropped_by_server=dropped,
    )
    assert dropped == clients
