"""qchat-sim, run as real processes: every knob, as the runner and the loop will meet it.

Each call has a timeout. A call that may leave processes behind (hangs, grandchildren,
memory children) starts in its own session, and its process group is killed in a finally.
Latency tests assert lower bounds only: machines are noisy.
"""

import contextlib
import hashlib
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import ralph_supervisor
from ralph_supervisor import simulator

SIM = [sys.executable, "-m", "ralph_supervisor.simulator"]
TIMEOUT = 20
MIB = 1024 * 1024
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


# -- helpers ------------------------------------------------------------------------------


def sim_env(**knobs: object) -> dict[str, str]:
    """This process's environment without simulator knobs or NO_COLOR, plus `knobs`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("QCHAT_SIM_") and name != "NO_COLOR"
    }
    for key, value in knobs.items():
        env["QCHAT_SIM_" + key.upper()] = str(value)
    return env


def run_sim(
    *args: str | bytes,
    cwd: Path,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    **knobs: object,
) -> subprocess.CompletedProcess[bytes]:
    """One call that leaves nothing behind; stdin is /dev/null unless given."""
    return subprocess.run(
        [*SIM, *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        cwd=cwd,
        env=env if env is not None else sim_env(**knobs),
        timeout=TIMEOUT,
        check=False,
    )


@contextlib.contextmanager
def sim_process(*args: str, cwd: Path, **knobs: object) -> Iterator[subprocess.Popen[bytes]]:
    """A call in its own session; its whole process group is SIGKILLed on the way out."""
    proc = subprocess.Popen(
        [*SIM, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=sim_env(**knobs),
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        kill_group(proc.pid)
        proc.wait(timeout=TIMEOUT)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def read_for(fd: int, seconds: float) -> tuple[bytes, bool]:
    """Read what arrives on `fd` within `seconds`; return it and whether EOF came."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
    return b"".join(chunks), False


def read_until(fd: int, wanted: bytes, seconds: float = TIMEOUT) -> bytes:
    """Read from `fd` until `wanted` shows up; fail after `seconds`."""
    data = b""
    deadline = time.monotonic() + seconds
    while wanted not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} within {seconds} s; got {data[-300:]!r}"
        chunk, eof = read_for(fd, min(left, 0.2))
        data += chunk
        assert not eof or wanted in data, f"EOF before {wanted!r}; got {data[-300:]!r}"
    return data


def wait_until(condition: Callable[[], bool], seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {seconds} s"
        time.sleep(0.02)


def live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != b"Z":
            members.append(int(entry))
    return members


def is_gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def sha_line(prompt: bytes) -> bytes:
    return f"sha256:{hashlib.sha256(prompt).hexdigest()} bytes:{len(prompt)}\n".encode()


# -- answers, colour and the command line -------------------------------------------------


def test_default_answer_depends_on_the_prompt_alone(tmp_path: Path) -> None:
    first = run_sim("Explain process groups", cwd=tmp_path)
    again = run_sim("Explain process groups", cwd=tmp_path)
    other = run_sim("Explain file descriptors", cwd=tmp_path)

    assert first.returncode == 0
    assert b"Explain process groups" in first.stdout
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout
    assert b"\x1b[" not in first.stdout


def test_stderr_carries_ansi_chatter_even_off_a_terminal(tmp_path: Path) -> None:
    result = run_sim("hello", cwd=tmp_path)

    assert b"\x1b[" in result.stderr
    assert b"Thinking" in result.stderr


def test_no_color_leaves_no_escape_sequence(tmp_path: Path) -> None:
    env = sim_env(failure="auth")
    env["NO_COLOR"] = "1"

    result = run_sim("hello", cwd=tmp_path, env=env)

    assert b"\x1b" not in result.stderr
    assert b"error: You are not logged in, please log in with q login" in result.stderr


def test_ansi_stdout_strips_back_to_the_plain_answer(tmp_path: Path) -> None:
    plain = run_sim("Summarise the design", cwd=tmp_path)
    painted = run_sim("Summarise the design", cwd=tmp_path, ansi_stdout=1)

    assert b"\x1b[" in painted.stdout
    assert ANSI.sub(b"", painted.stdout) == plain.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "--no-interactive", "--trust-all-tools", "--model", "claude-x", "PROMPT"],
        ["PROMPT"],
        ["chat", "--unknown-flag", "--trust-tools=fs_read", "-v", "--model=m", "PROMPT"],
        ["--agent", "dev", "chat", "words", "before", "PROMPT"],
    ],
)
def test_command_line_is_read_like_q(argv: list[str], tmp_path: Path) -> None:
    prompt = "the prompt @sim:echo=sha256"
    argv = [prompt if word == "PROMPT" else word for word in argv]

    result = run_sim(*argv, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == sha_line(prompt.encode())


def test_double_dash_lets_a_prompt_start_with_a_dash(tmp_path: Path) -> None:
    prompt = "--not-a-flag @sim:echo=sha256"

    result = run_sim("chat", "--", prompt, cwd=tmp_path)

    assert result.stdout == sha_line(prompt.encode())


def test_help_and_version_exit_0(tmp_path: Path) -> None:
    usage = run_sim("--help", cwd=tmp_path)
    version = run_sim("--version", cwd=tmp_path)

    assert usage.returncode == 0 and b"usage: qchat-sim" in usage.stdout
    assert b"latency" in usage.stdout
    assert version.returncode == 0 and ralph_supervisor.__version__.encode() in version.stdout


# -- the prompt arrives byte for byte -----------------------------------------------------

PROMPTS = [
    pytest.param(b"plain ascii", id="ascii"),
    pytest.param("h\u00e9llo w\u00f6rld \u2014 \u65e5\u672c\u8a9e \U0001f680".encode(), id="utf8"),
    pytest.param(
        b"$(touch pwned) `touch pwned2`; rm -rf ./x && echo $HOME | cat > out < in"
        b" * ? ~ 'single' \"double\" \\back !bang %s %n",
        id="shell-metacharacters",
    ),
    pytest.param(b"line one\nline two\r\n\ttabbed  \n\n", id="whitespace"),
    pytest.param(b"\xff\xfe not utf-8 \xc3", id="invalid-utf8"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sha256_echo_of_a_prompt_in_argv(prompt: bytes, tmp_path: Path) -> None:
    result = run_sim("chat", "--no-interactive", prompt, cwd=tmp_path, echo="sha256")

    assert result.returncode == 0, result.stderr
    assert result.stdout == sha_line(prompt)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "pwned2").exists()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sha256_echo_of_a_prompt_on_stdin(prompt: bytes, tmp_path: Path) -> None:
    result = run_sim("chat", "--no-interactive", cwd=tmp_path, stdin=prompt, echo="sha256")

    assert result.returncode == 0, result.stderr
    assert result.stdout == sha_line(prompt)


def test_echo_prompt_returns_the_exact_bytes(tmp_path: Path) -> None:
    # Above the 128 KiB limit of one argv word: such prompts travel on stdin.
    prompt = "\u00fcnicode \U0001f680 $HOME `x`\n".encode() * 8000

    result = run_sim("chat", cwd=tmp_path, stdin=prompt, echo="prompt")

    assert len(prompt) > 128 * 1024
    assert result.stdout == prompt


def test_stdin_is_appended_to_a_prompt_word_as_q_does(tmp_path: Path) -> None:
    appended = run_sim("abc", cwd=tmp_path, stdin=b"def", echo="sha256")
    ignored = run_sim("abc @sim:stdin=ignore", cwd=tmp_path, stdin=b"def", echo="sha256")

    assert appended.stdout == sha_line(b"abcdef")
    assert ignored.stdout == sha_line(b"abc @sim:stdin=ignore")


# -- latency ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("latency", "at_least"),
    [("0.4", 0.4), ("fixed:0.3", 0.3), ("uniform:0.3:0.5", 0.3), ("lognormal:0.5:0.01", 0.4)],
)
def test_latency_is_respected(latency: str, at_least: float, tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_sim("hello", cwd=tmp_path, latency=latency)
    elapsed = time.monotonic() - started

    assert result.returncode == 0
    assert elapsed >= at_least


def test_complex_profile_takes_its_time(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_sim("hello @sim:profile=complex", cwd=tmp_path)

    # Its lowest draws are near 0.66 s: below 0.5 s is five sigma away.
    assert time.monotonic() - started >= 0.5
    assert b"```python" in result.stdout


def test_instant_profile_answers_minimally(tmp_path: Path) -> None:
    result = run_sim("hello", cwd=tmp_path, profile="instant")

    assert result.returncode == 0
    assert result.stdout == b"ok\n"
    assert result.stderr == b""


def sample(profile: str, count: int) -> list[float]:
    settings = simulator.Settings({"profile": (profile, "test"), "seed": ("7", "test")})
    call = simulator.Call(b"a prompt", settings, None)
    return sorted(simulator.sample_latency(call) for _ in range(count))


@pytest.mark.parametrize(
    ("profile", "median", "p99_below", "cap"),
    [("simple", 0.3, 0.7, None), ("complex", 1.2, 1.9, 1.9)],
)
def test_profiles_have_the_documented_shape(
    profile: str, median: float, p99_below: float, cap: float | None
) -> None:
    draws = sample(profile, 20000)

    assert median * 0.95 <= draws[10000] <= median * 1.05
    assert draws[19800] < p99_below
    assert draws[19800] > draws[10000] * 1.2  # a tail to the right
    if cap is not None:
        assert draws[-1] <= cap


def test_a_seed_replays_the_same_draws() -> None:
    assert sample("complex", 50) == sample("complex", 50)
    settings = simulator.Settings({"latency": ("uniform:0:1", "test"), "seed": ("7", "test")})
    first = simulator.sample_latency(simulator.Call(b"one", settings, None))
    second = simulator.sample_latency(simulator.Call(b"two", settings, None))
    assert first != second


# -- output volume, exit codes and signals ------------------------------------------------


def test_writes_exactly_n_bytes_to_stdout_and_stderr(tmp_path: Path) -> None:
    result = run_sim(
        "hello",
        cwd=tmp_path,
        repeat="x",
        chatter=0,
        stdout_bytes=5242880,
        stderr_bytes="50M",
    )

    assert result.returncode == 0
    assert len(result.stdout) == len(b"x\n") + 5 * MIB
    assert result.stdout.startswith(b"x\nqchat-sim filler")
    assert len(result.stderr) == 50 * MIB


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exits_with_the_code_asked(code: int, tmp_path: Path) -> None:
    result = run_sim("hello", cwd=tmp_path, exit=code)

    assert result.returncode == code
    assert b"You asked" in result.stdout


@pytest.mark.parametrize(
    ("name", "number"),
    [("KILL", signal.SIGKILL), ("SIGTERM", signal.SIGTERM), ("11", signal.SIGSEGV)],
)
def test_dies_by_the_signal_asked(name: str, number: int, tmp_path: Path) -> None:
    result = run_sim("hello", cwd=tmp_path, signal=name)

    assert result.returncode == -number
    assert b"You asked" in result.stdout


# -- hangs and grandchildren --------------------------------------------------------------


def test_hang_ignoring_sigterm_needs_sigkill(tmp_path: Path) -> None:
    with sim_process("hello", cwd=tmp_path, hang=1, ignore_sigterm=1) as proc:
        assert proc.stderr is not None
        read_until(proc.stderr.fileno(), b"Thinking")

        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None

        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL


def test_hang_without_ignore_ends_on_sigterm(tmp_path: Path) -> None:
    with sim_process("hello", cwd=tmp_path, hang="before") as proc:
        assert proc.stderr is not None
        read_until(proc.stderr.fileno(), b"Thinking")

        os.killpg(proc.pid, signal.SIGTERM)

        assert proc.wait(timeout=TIMEOUT) == -signal.SIGTERM


def test_hang_after_the_answer_keeps_the_partial_output(tmp_path: Path) -> None:
    with sim_process("hello", cwd=tmp_path, hang="after") as proc:
        assert proc.stdout is not None
        read_until(proc.stdout.fileno(), b"You asked")

        assert proc.poll() is None


def test_grandchild_holds_the_pipes_until_the_group_is_killed(tmp_path: Path) -> None:
    with sim_process("hello", cwd=tmp_path, grandchild="forever") as proc:
        assert proc.stdout is not None
        stdout = proc.stdout.fileno()

        # The simulator is done at once, but its stdout does not reach EOF.
        assert proc.wait(timeout=TIMEOUT) == 0
        answer, eof = read_for(stdout, 0.5)
        assert b"You asked" in answer
        assert not eof
        assert live_group_members(proc.pid)

        kill_group(proc.pid)
        _, eof = read_for(stdout, TIMEOUT)
        assert eof
        wait_until(lambda: not live_group_members(proc.pid))


def test_grandchild_for_seconds_delays_eof(tmp_path: Path) -> None:
    with sim_process("hello", cwd=tmp_path, grandchild=1) as proc:
        assert proc.stdout is not None
        started = time.monotonic()

        assert proc.wait(timeout=TIMEOUT) == 0
        _, eof = read_for(proc.stdout.fileno(), TIMEOUT)

        assert eof
        assert time.monotonic() - started >= 0.8


# -- q's failure messages -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "text"),
    [
        ("throttled", "rate limit reached"),
        ("rate_limit", "rate limit reached"),
        ("quota", "Request quota exceeded"),
        ("throttling_exception", "ThrottlingException"),
        ("monthly_limit", "Monthly request limit reached"),
        ("auth", "error: You are not logged in, please log in with q login"),
        ("not_logged_in", "error: You are not logged in, please log in with q login"),
        ("auth_error", "Authentication Error"),
        ("service", "Amazon Q is having trouble responding right now"),
        ("trouble", "Amazon Q is having trouble responding right now"),
        ("unavailable", "service temporarily unavailable"),
    ],
)
def test_failure_messages_exit_0_like_q(failure: str, text: str, tmp_path: Path) -> None:
    result = run_sim("hello", cwd=tmp_path, failure=failure)

    assert result.returncode == 0
    assert result.stdout == b""
    assert b"\x1b[" in result.stderr
    assert text.encode() in ANSI.sub(b"", result.stderr)


def test_failure_kinds_use_distinct_phrases() -> None:
    phrases = {
        "throttled": ("rate limit", "quota", "Throttling", "Monthly request limit"),
        "auth": ("log in", "Authentication Error"),
        "service": ("trouble responding", "temporarily unavailable"),
    }
    for name, (kind, template) in simulator.FAILURES.items():
        for other, words in phrases.items():
            if other != kind:
                assert not any(word in template for word in words), (name, other)


# -- memory -------------------------------------------------------------------------------


def test_memory_is_held_resident(tmp_path: Path) -> None:
    with sim_process("hello", cwd=tmp_path, memory_mb=64, hang=1) as proc:
        process = psutil.Process(proc.pid)

        wait_until(lambda: process.memory_info().rss >= 64 * MIB)


def test_child_memory_counts_tree_wide_and_ends_with_the_simulator(tmp_path: Path) -> None:
    with sim_process("hello", cwd=tmp_path, child_memory_mb=64, hang="after") as proc:
        assert proc.stdout is not None
        # The answer comes only once the child's memory is resident.
        read_until(proc.stdout.fileno(), b"You asked")
        process = psutil.Process(proc.pid)
        (child,) = process.children()
        assert child.memory_info().rss >= 64 * MIB
        assert process.memory_info().rss < 64 * MIB

        # Killing the simulator alone ends the memory child too.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        wait_until(lambda: is_gone(child))


# -- counting invocations -----------------------------------------------------------------


def test_count_file_counts_concurrent_calls_exactly(tmp_path: Path) -> None:
    count_file = tmp_path / "count.log"
    env = sim_env(count_file=count_file, profile="instant")
    procs = [
        subprocess.Popen(
            [*SIM, f"prompt {index}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path,
            env=env,
        )
        for index in range(24)
    ]
    for proc in procs:
        assert proc.wait(timeout=TIMEOUT) == 0

    lines = count_file.read_text().splitlines()
    assert len(lines) == 24
    pids = {int(line.split("\t")[0]) for line in lines}
    assert pids == {proc.pid for proc in procs}
    digests = {line.split("\t")[2] for line in lines}
    expected = {"sha256:" + hashlib.sha256(f"prompt {i}".encode()).hexdigest() for i in range(24)}
    assert digests == expected


def test_count_file_counts_a_call_with_a_bad_knob(tmp_path: Path) -> None:
    count_file = tmp_path / "count.log"

    result = run_sim("hello @sim:latency=soon", cwd=tmp_path, count_file=count_file)

    assert result.returncode == 2
    assert len(count_file.read_text().splitlines()) == 1


# -- the Ralph loop -----------------------------------------------------------------------

CHECKLIST = """\
# Task

Build the thing.

- [ ] write the parser
- [x] pick a name
* [ ] handle errors
  - [ ] nested: document it

Not an item: [ ] here, nor -[ ] this.
"""


def boxes_left(path: Path) -> int:
    return len(re.findall(r"^\s*[-*+] \[ \]", path.read_text(), re.MULTILINE))


def test_loop_ticks_one_item_per_call_then_promises(tmp_path: Path) -> None:
    prompt_file = tmp_path / "PROMPT.md"
    prompt_file.write_text(CHECKLIST)
    prompt_file.chmod(0o640)
    answers = []

    for call in range(3):
        result = run_sim(prompt_file.read_text(), cwd=tmp_path, work_dir="work")
        assert result.returncode == 0, result.stderr
        assert boxes_left(prompt_file) == 2 - call
        answers.append(result.stdout.decode())

    assert "item 1 of 4: write the parser" in answers[0]
    assert "item 3 of 4: handle errors" in answers[1]
    assert "item 4 of 4: nested: document it" in answers[2]
    assert ["LOOP_COMPLETE" in answer for answer in answers] == [False, False, True]
    assert "Not an item: [ ] here, nor -[ ] this." in prompt_file.read_text()
    assert stat.S_IMODE(prompt_file.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path / "work")) == ["item-1.txt", "item-3.txt", "item-4.txt"]
    assert sorted(os.listdir(tmp_path)) == ["PROMPT.md", "work"]

    # Nothing left to do: the promise again, and no edit.
    before = prompt_file.read_bytes()
    result = run_sim(before, cwd=tmp_path)
    assert "LOOP_COMPLETE" in result.stdout.decode()
    assert prompt_file.read_bytes() == before


def test_loop_uses_the_named_file_and_promise(tmp_path: Path) -> None:
    (tmp_path / "TODO.md").write_text("- [ ] only item\n")

    result = run_sim("go", cwd=tmp_path, prompt_file="TODO.md", promise="ALL_DONE")

    assert result.stdout.decode().splitlines()[-1] == "ALL_DONE"
    assert (tmp_path / "TODO.md").read_text() == "- [x] only item\n"


def test_stalled_agent_edits_nothing(tmp_path: Path) -> None:
    prompt_file = tmp_path / "PROMPT.md"
    prompt_file.write_text(CHECKLIST)

    results = [run_sim("go", cwd=tmp_path, stall=1) for _ in range(3)]

    assert prompt_file.read_text() == CHECKLIST
    assert all(b"item 1 of 4" in result.stdout for result in results)
    assert not any(b"LOOP_COMPLETE" in result.stdout for result in results)


def test_repeating_agent_answers_the_same_text(tmp_path: Path) -> None:
    prompt_file = tmp_path / "PROMPT.md"
    prompt_file.write_text(CHECKLIST)

    working = [run_sim("go", cwd=tmp_path, repeat="I am on it.") for _ in range(2)]
    assert [result.stdout for result in working] == [b"I am on it.\n"] * 2
    assert boxes_left(prompt_file) == 1

    stuck = run_sim('go @sim:stall=1 @sim:repeat="I am on it."', cwd=tmp_path)
    assert stuck.stdout == b"I am on it.\n"
    assert boxes_left(prompt_file) == 1


def test_loop_on_without_the_file_fails(tmp_path: Path) -> None:
    result = run_sim("go", cwd=tmp_path, loop="on")

    assert result.returncode == 1
    assert b"PROMPT.md" in result.stderr


def test_loop_off_ignores_the_checklist(tmp_path: Path) -> None:
    (tmp_path / "PROMPT.md").write_text(CHECKLIST)

    result = run_sim("go", cwd=tmp_path, loop="off")

    assert b"You asked" in result.stdout
    assert (tmp_path / "PROMPT.md").read_text() == CHECKLIST


# -- fault injection ----------------------------------------------------------------------


def test_crash_rate_1_always_crashes(tmp_path: Path) -> None:
    codes = {
        run_sim(f"p{seed}", cwd=tmp_path, crash_rate=1, seed=seed).returncode for seed in range(6)
    }

    assert codes <= {1, 101, -signal.SIGKILL}
    assert len(codes) > 1


def test_throttle_rate_1_always_throttles(tmp_path: Path) -> None:
    result = run_sim("hello", cwd=tmp_path, throttle_rate=1)

    assert result.returncode == 0
    assert result.stdout == b""
    stderr = ANSI.sub(b"", result.stderr)
    assert any(phrase in stderr for phrase in (b"rate limit", b"quota", b"Throttling", b"Monthly"))


def test_hang_rate_1_hangs_ignoring_sigterm(tmp_path: Path) -> None:
    with sim_process("hello", cwd=tmp_path, hang_rate=1) as proc:
        assert proc.stderr is not None
        read_until(proc.stderr.fileno(), b"Thinking")

        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.3)

        assert proc.poll() is None


def test_seeded_faults_replay_exactly(tmp_path: Path) -> None:
    def outcomes() -> list[tuple[int, bytes]]:
        env = sim_env(crash_rate=0.3, throttle_rate=0.3, seed=42, profile="instant")
        results = [run_sim(f"prompt {index}", cwd=tmp_path, env=env) for index in range(8)]
        return [(result.returncode, result.stdout) for result in results]

    first = outcomes()

    assert first == outcomes()
    assert len(set(first)) > 1


# -- knobs: precedence and errors ---------------------------------------------------------


def test_a_directive_overrides_the_environment(tmp_path: Path) -> None:
    result = run_sim("hello @sim:exit=4", cwd=tmp_path, exit=3)

    assert result.returncode == 4


@pytest.mark.parametrize(
    ("knobs", "prompt", "names"),
    [
        ({"latency": "abc"}, "hi", "latency"),
        ({"latency": "uniform:2:1"}, "hi", "latency"),
        ({"stdout_bytes": "-1"}, "hi", "stdout_bytes"),
        ({"stderr_bytes": "lots"}, "hi", "stderr_bytes"),
        ({"exit": "300"}, "hi", "exit"),
        ({"signal": "NOPE"}, "hi", "signal"),
        ({"signal": "CHLD"}, "hi", "signal"),
        ({"crash_rate": "1.5"}, "hi", "crash_rate"),
        ({"crash_rate": "0.6", "hang_rate": "0.6"}, "hi", "crash_rate"),
        ({"hang": "sideways"}, "hi", "hang"),
        ({"failure": "bogus"}, "hi", "failure"),
        ({"profile": "fast"}, "hi", "profile"),
        ({"echo": "md5"}, "hi", "echo"),
        ({"memory_mb": "1.5"}, "hi", "memory_mb"),
        ({"lantecy": "1"}, "hi", "latency"),
        ({}, "hi @sim:latency=soon", "@sim:latency"),
        ({}, "hi @sim:nope=1", "nope"),
        ({}, "hi @sim:latency", "@sim:latency"),
        ({}, 'hi @sim:repeat="never closed', "unterminated"),
    ],
)
def test_a_bad_knob_exits_2_with_one_line(
    knobs: dict[str, str], prompt: str, names: str, tmp_path: Path
) -> None:
    result = run_sim(prompt, cwd=tmp_path, env=sim_env(**knobs))

    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    assert result.stderr.count(b"\n") == 1
    assert result.stderr.startswith(b"qchat-sim: ")
    assert names.encode() in result.stderr
    assert result.stdout == b""


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    result = run_sim("hello", cwd=tmp_path, latency="", exit="")

    assert result.returncode == 0


# -- the module ---------------------------------------------------------------------------


def test_main_runs_in_process(capfd: pytest.CaptureFixture[str]) -> None:
    code = simulator.main(["chat", "hi @sim:stdin=ignore @sim:echo=sha256 @sim:profile=instant"])

    out, err = capfd.readouterr()
    assert code == 0
    assert out == sha_line(b"hi @sim:stdin=ignore @sim:echo=sha256 @sim:profile=instant").decode()
    assert err == ""


def test_import_pulls_in_nothing_heavy() -> None:
    # -S: no site, so only what the module itself imports shows up.
    repo = Path(simulator.__file__).resolve().parents[1]
    script = (
        "import sys; before = set(sys.modules);"
        "import ralph_supervisor.simulator;"
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", script],
        capture_output=True,
        env={**sim_env(), "PYTHONPATH": str(repo)},
        timeout=TIMEOUT,
        check=True,
    )

    loaded = set(result.stdout.decode().split())
    heavy = {"hashlib", "random", "re", "signal", "typing", "dataclasses", "psutil", "yaml"}
    assert not loaded & heavy
    assert {name for name in loaded if name.startswith("ralph_supervisor.")} == {
        "ralph_supervisor.simulator"
    }
