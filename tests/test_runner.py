"""The runner against real processes: the simulator stands in for q."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ralph_supervisor.agents import PROFILES, CompiledPatterns
from ralph_supervisor.errors import (
    MemoryLimitExceeded,
    OutputTooLarge,
    PromptRejected,
    QChatAuthError,
    QChatProcessError,
    QChatServiceError,
    QChatThrottled,
    QChatTimeout,
)
from ralph_supervisor.prompts import PromptPolicy
from ralph_supervisor.runner import ARGV_PROMPT_LIMIT, CallSpec, Limits, run_call, strip_ansi

# As AgentGuard.spec builds it: "--" before the prompt word, so a prompt
# that starts with "-" is not read as an option.
SIM = (sys.executable, "-m", "ralph_supervisor.simulator", "chat", "--no-interactive", "--")
PATTERNS = CompiledPatterns.of(PROFILES["sim"])


def call(prompt: str, *, timeout: float = 20.0, cwd: str | None = None, **limits: object):
    spec = CallSpec(
        argv=SIM,
        prompt=prompt,
        deadline=time.monotonic() + timeout,
        cwd=cwd,
        limits=Limits(**limits),  # type: ignore[arg-type]
        patterns=PATTERNS,
        agent="sim",
    )
    return run_call(spec)


def sha(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def test_answer_arrives_with_ansi_stripped() -> None:
    response = call("explain the build @sim:ansi_stdout=1")
    assert response.exit_code == 0
    assert "\x1b" not in response.text
    assert "\x1b" not in response.stderr
    assert response.text.strip()
    assert response.duration_s > 0


def test_strip_ansi_removes_colour_cursor_and_osc() -> None:
    coloured = "\x1b[1m\x1b[31merror\x1b[0m: \x1b[?25lok\x1b]0;title\x07 done"
    assert strip_ansi(coloured) == "error: ok done"


def test_shell_metacharacters_arrive_verbatim(tmp_path: Path) -> None:
    prompt = '$(touch pwned) `touch pwned2`; rm -rf x | cat > pwned3 && echo "\'" @sim:echo=sha256'
    response = call(prompt, cwd=str(tmp_path))
    assert f"sha256:{sha(prompt)}" in response.text
    assert list(tmp_path.iterdir()) == []


def test_one_mebibyte_prompt_goes_on_stdin() -> None:
    prompt = "@sim:echo=sha256 " + "x" * (1024 * 1024 - 20)
    assert len(prompt.encode()) > ARGV_PROMPT_LIMIT
    response = call(prompt)
    assert f"sha256:{sha(prompt)}" in response.text


def test_prompt_at_the_argv_limit_still_works() -> None:
    prompt = "@sim:echo=sha256 " + "é" * ((ARGV_PROMPT_LIMIT - 20) // 2)
    assert len(prompt.encode()) <= ARGV_PROMPT_LIMIT
    response = call(prompt)
    assert f"sha256:{sha(prompt)}" in response.text


def test_fifty_megabytes_of_stderr_do_not_deadlock() -> None:
    response = call("@sim:stderr_bytes=50M @sim:chatter=0", max_output_size=60 * 1024 * 1024)
    assert len(response.stderr) >= 50 * 1024 * 1024
    assert response.text.strip()


def test_five_mebibytes_of_stdout_arrive_whole() -> None:
    response = call("@sim:stdout_bytes=5M")
    assert len(response.text) >= 5 * 1024 * 1024


def test_output_limit_kills_the_group() -> None:
    with pytest.raises(OutputTooLarge) as caught:
        call("@sim:stdout_bytes=8M @sim:hang=after", max_output_size=1024 * 1024)
    assert "max_output_size" in str(caught.value)
    assert len(caught.value.partial_output) > 0


def test_deadline_terminates_then_kills_a_hang_that_ignores_sigterm() -> None:
    started = time.monotonic()
    with pytest.raises(QChatTimeout) as caught:
        call("@sim:hang=before @sim:ignore_sigterm=1", timeout=0.5, kill_grace=0.5)
    elapsed = time.monotonic() - started
    assert elapsed >= 1.0  # the deadline, then the whole grace: SIGTERM was ignored
    assert "killed" in str(caught.value)
    assert caught.value.elapsed is not None


def test_deadline_keeps_partial_output() -> None:
    with pytest.raises(QChatTimeout) as caught:
        call("partial please @sim:hang=after", timeout=1.0, kill_grace=0.2)
    assert caught.value.partial_output.strip()


def test_grandchild_holding_the_pipes_does_not_hold_the_call() -> None:
    started = time.monotonic()
    response = call("@sim:grandchild=forever", exit_linger=0.3)
    assert time.monotonic() - started < 10
    assert response.text.strip()
    # The autouse leak check fails this test if the grandchild survived.


def test_grandchild_that_ignores_sigterm_is_killed_at_the_deadline() -> None:
    with pytest.raises(QChatTimeout):
        call(
            "@sim:grandchild=forever @sim:ignore_sigterm=1 @sim:hang=before",
            timeout=0.5,
            kill_grace=0.3,
        )


@pytest.mark.parametrize(
    ("failure", "error_type"),
    [
        ("rate_limit", QChatThrottled),
        ("quota", QChatThrottled),
        ("throttling_exception", QChatThrottled),
        ("monthly_limit", QChatThrottled),
        ("not_logged_in", QChatAuthError),
        ("auth_error", QChatAuthError),
        ("trouble", QChatServiceError),
        ("unavailable", QChatServiceError),
    ],
)
def test_q_failure_messages_with_exit_zero_are_typed(failure: str, error_type: type) -> None:
    with pytest.raises(error_type) as caught:
        call(f"hello @sim:failure={failure}")
    assert caught.value.exit_code == 0
    assert caught.value.stderr_tail


def test_non_zero_exit_is_a_process_error() -> None:
    with pytest.raises(QChatProcessError) as caught:
        call("@sim:exit=3")
    assert caught.value.exit_code == 3
    assert "status 3" in str(caught.value)


def test_death_by_signal_is_a_process_error() -> None:
    with pytest.raises(QChatProcessError) as caught:
        call("@sim:signal=KILL")
    assert caught.value.signal == 9
    assert "SIGKILL" in str(caught.value)


def test_memory_limit_counts_the_whole_tree() -> None:
    with pytest.raises(MemoryLimitExceeded) as caught:
        call("@sim:child_memory_mb=200 @sim:hang=after", max_memory_mb=100, poll_interval=0.05)
    assert "max_memory_mb" in str(caught.value)


def test_memory_under_the_limit_is_fine() -> None:
    response = call("@sim:memory_mb=20", max_memory_mb=500, poll_interval=0.05)
    assert response.exit_code == 0


def test_missing_command_is_not_retryable() -> None:
    spec = CallSpec(argv=("no-such-agent-cli",), prompt="hi", deadline=time.monotonic() + 5)
    with pytest.raises(QChatProcessError) as caught:
        run_call(spec)
    assert caught.value.retryable is False
    assert "not found" in str(caught.value)


def test_no_color_is_set_for_the_agent() -> None:
    spec = CallSpec(
        argv=(sys.executable, "-c", "import os,sys; print(os.environ.get('NO_COLOR'))"),
        prompt="x",
        deadline=time.monotonic() + 10,
    )
    assert run_call(spec).text.strip() == "1"


def test_stdin_is_dev_null_when_the_prompt_is_an_argument() -> None:
    # q reads a non-terminal stdin to its end: an open pipe would hang it.
    spec = CallSpec(
        argv=(sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"),
        prompt="x",
        deadline=time.monotonic() + 10,
    )
    assert run_call(spec).text.strip() == "''"


def test_errors_survive_pickling() -> None:
    import pickle

    with pytest.raises(QChatProcessError) as caught:
        call("@sim:exit=4")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is QChatProcessError
    assert copy.exit_code == 4
    assert str(copy) == str(caught.value)


# -- prompts ------------------------------------------------------------------


def test_prompt_validation_rejects_with_reasons() -> None:
    policy = PromptPolicy(max_bytes=100, blocked_patterns=[r"rm -rf /"])
    for bad, reason in [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("\0\0", "empty"),
        ("x" * 101, "max_prompt_length"),
        ("a\ud800b", "surrogate"),
        ("please rm -rf / now", "blocked_patterns"),
        (b"bytes", "text"),
    ]:
        with pytest.raises(PromptRejected, match=reason):
            policy.validate(bad)
    assert policy.validate("a\0b") == "ab"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.text(min_size=0, max_size=300))
def test_any_text_arrives_byte_for_byte_or_is_rejected(text: str) -> None:
    policy = PromptPolicy()
    try:
        prompt = policy.validate(text)
    except PromptRejected:
        return

    # The echo directive is appended as its own word; a prompt that holds
    # directives of its own may change the simulator's behaviour, so skip those.
    if "@sim:" in prompt:
        return
    full = prompt + " @sim:echo=sha256"
    response = call(full)
    assert f"sha256:{sha(full)}" in response.text


def test_simulator_is_a_real_process_here() -> None:
    # Guards the suite itself: the simulator must be runnable as a module.
    done = subprocess.run([*SIM, "-x @sim:echo=sha256"], capture_output=True, timeout=30)
    assert done.returncode == 0
    assert b"sha256:" in done.stdout


def test_the_package_exports_the_library_lazily() -> None:
    import ralph_supervisor

    for name in ralph_supervisor.__all__:
        assert getattr(ralph_supervisor, name) is not None

    # The simulator starts at every call: importing the package must not
    # drag the whole library (yaml, diskcache, pybreaker) in with it.
    code = "import sys, ralph_supervisor.simulator; print('diskcache' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "False"


def test_agents_carry_their_request_id_and_can_be_found_by_it() -> None:
    from ralph_supervisor.runner import REQUEST_ENV, kill_agents_of

    spec = CallSpec(
        argv=(sys.executable, "-c", f"import os; print(os.environ['{REQUEST_ENV}'])"),
        prompt="x",
        deadline=time.monotonic() + 10,
        request_id="req-123",
    )
    assert run_call(spec).text.strip() == "req-123"

    # An agent whose worker never named its group is still found and killed.
    orphan = subprocess.Popen(
        ["sleep", "30"],
        env={**os.environ, REQUEST_ENV: "req-lost"},
        start_new_session=True,
    )
    try:
        assert kill_agents_of("req-lost") == 1
        assert orphan.wait(timeout=10) == -9
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(10)
