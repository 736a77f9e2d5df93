"""`ralph-supervisor config ...` run as a real process, the way an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ralph_supervisor import __version__
from ralph_supervisor.config import SETTINGS, render_example

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60

GUIDE_FILE = """\
adapter:
  name: qchat
  timeout: 300
  max_retries: 5
  retry_delay: 2

performance:
  buffer_size: 8192
  poll_interval: 0.1
  max_concurrent: 10

logging:
  level: INFO
  format: "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
  file: /var/log/ralph/qchat.log

monitoring:
  metrics_enabled: true
  metrics_interval: 60
  health_check_port: 8080
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any setting's variable, plus `extra`."""
    names = {item.env for item in SETTINGS.values() if item.env}
    env = {name: value for name, value in os.environ.items() if name not in names}
    env.update(extra)
    return env


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ralph_supervisor", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env() if env is None else env,
        cwd=cwd,
    )


def run_script(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env() if env is None else env,
    )


def write(tmp_path: Path, text: str, name: str = "qchat.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# config show


def test_show_defaults() -> None:
    result = run("config", "show")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "adapter:\n  name: q " in result.stdout
    assert "# from default" in result.stdout
    assert result.stdout.count("# from ") == len(SETTINGS)


def test_show_notes_file_lines_and_env(tmp_path: Path) -> None:
    path = write(tmp_path, GUIDE_FILE)
    result = run("config", "show", "--config", str(path), env=clean_env(QCHAT_TIMEOUT="45"))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("  name: qchat ") and f"# from {path}:2" in line for line in lines)
    assert any(
        line.startswith("  timeout: 45.0 ") and "# from env QCHAT_TIMEOUT" in line
        for line in lines
    )
    assert any(line.startswith("  buffer_size: 8192 ") for line in lines)


def test_show_with_a_bad_file_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "adapter:\n  timeout: soon\n  timout: 3\n")
    result = run("config", "show", "--config", str(path))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"ralph-supervisor: {path}:2: adapter.timeout: expected a positive number of "
        "seconds, got 'soon' (and 1 more)\n"
    )


def test_show_with_a_bad_env_var() -> None:
    result = run("config", "show", env=clean_env(QCHAT_MAX_CONCURRENT="ten"))

    assert result.returncode == 2
    assert result.stderr == (
        "ralph-supervisor: env QCHAT_MAX_CONCURRENT: performance.max_concurrent: "
        "expected a positive integer, got 'ten'\n"
    )


def test_show_with_a_missing_file(tmp_path: Path) -> None:
    result = run("config", "show", "--config", str(tmp_path / "nope.yaml"))

    assert result.returncode == 2
    assert "cannot read the file" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# config validate


def test_validate_a_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, GUIDE_FILE)
    result = run("config", "validate", str(path))

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok\n"
    assert result.stderr == ""


def test_validate_the_example_file() -> None:
    result = run("config", "validate", "config/qchat.yaml", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config/qchat.yaml: ok\n"


def test_validate_lists_every_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "adapter:\n"
        "  timout: 5\n"
        "performance:\n"
        "  max_concurrent: ten\n"
        "security:\n"
        "  blocked_patterns: ['(']\n",
    )
    result = run("config", "validate", str(path))

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 3
    assert lines[0] == f"{path}:2: unknown key 'adapter.timout' (did you mean 'adapter.timeout'?)"
    assert lines[1] == (
        f"{path}:4: performance.max_concurrent: expected a positive integer, got 'ten'"
    )
    assert lines[2].startswith(
        f"{path}:6: security.blocked_patterns[0]: expected a valid regular expression"
    )


def test_validate_ignores_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, GUIDE_FILE)
    result = run("config", "validate", str(path), env=clean_env(QCHAT_TIMEOUT="never"))
    assert result.returncode == 0, result.stderr


BAD_FILES = {
    "syntax": "adapter:\n  name: [q\n",
    "tabs": "adapter:\n\ttimeout: 5\n",
    "top-level list": "- adapter\n",
    "alias bomb": 'a: &a ["lol","lol"]\nb: &b [*a,*a,*a]\nc: [*b,*b,*b]\n',
    "python tag": "adapter:\n  name: !!python/object/apply:os.system ['true']\n",
    "huge number": "adapter:\n  timeout: 1.0e+400\n  max_retries: " + "9" * 5000 + "\n",
    "deep nesting": "tasks: " + "[" * 20000 + "]" * 20000 + "\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_validate_bad_files_without_traceback(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, BAD_FILES[kind])
    result = run("config", "validate", str(path))

    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{path}:")
    assert result.stdout == ""


def test_validate_binary_file_and_directory(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    for path in (binary, tmp_path, tmp_path / "missing.yaml"):
        result = run("config", "validate", str(path))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith(f"{path}")


# ---------------------------------------------------------------------------
# config example, help, version, usage


def test_example_prints_the_documented_file() -> None:
    result = run("config", "example")
    assert result.returncode == 0
    assert result.stdout == render_example()
    assert result.stdout == (ROOT / "config" / "qchat.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "args",
    [["--help"], ["config", "--help"], ["config", "show", "--help"], ["config", "validate", "-h"]],
)
def test_help(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: ralph-supervisor")
    assert result.stderr == ""


def test_help_shows_defaults() -> None:
    result = run("config", "show", "--help")
    assert "(default: None)" in result.stdout


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == f"ralph-supervisor {__version__}\n"


@pytest.mark.parametrize(
    "args", [[], ["nope"], ["config"], ["config", "validate"], ["config", "show", "--bogus"]]
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert "usage: ralph-supervisor" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_closed_stdout_is_quiet() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "ralph_supervisor", "config", "example"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the child writes: its write gets EPIPE
    stderr = process.stderr.read()
    assert process.wait(timeout=TIMEOUT) == 141
    assert stderr == b""


# ---------------------------------------------------------------------------
# main's handling of failures, through a command registered the way others
# will register theirs.

FAILING_COMMAND = """
import sys
from ralph_supervisor import cli
from ralph_supervisor.errors import QChatTimeout

def add_fail_parser(subparsers):
    parser = subparsers.add_parser("fail", help="fail on purpose")
    parser.add_argument("kind", help="what to raise")
    parser.set_defaults(handler=run_fail)

def run_fail(args):
    if args.kind == "bug":
        raise RuntimeError("boom")
    if args.kind == "timeout":
        raise QChatTimeout("q did not answer within 5s")
    if args.kind == "interrupt":
        raise KeyboardInterrupt
    if args.kind == "oserror":
        raise PermissionError(13, "Permission denied", "/var/lib/ralph")
    return 3

cli.COMMANDS += (("fail", add_fail_parser),)
sys.exit(cli.main(["fail", sys.argv[1]]))
"""


def run_failing(kind: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", FAILING_COMMAND, kind],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env(**env),
    )


def test_a_handler_exit_code_is_returned() -> None:
    assert run_failing("none").returncode == 3


def test_an_internal_error_is_one_line_and_a_hint() -> None:
    result = run_failing("bug")
    assert result.returncode == 70
    assert result.stderr == (
        "ralph-supervisor: internal error: RuntimeError: boom\n"
        "ralph-supervisor: rerun with QCHAT_DEBUG=1 to see the traceback\n"
    )


def test_qchat_debug_shows_the_traceback() -> None:
    result = run_failing("bug", QCHAT_DEBUG="1")
    assert result.returncode == 70
    assert "Traceback" in result.stderr
    assert result.stderr.endswith("ralph-supervisor: internal error: RuntimeError: boom\n")


def test_a_qchat_error_exits_1() -> None:
    result = run_failing("timeout")
    assert result.returncode == 1
    assert result.stderr == "ralph-supervisor: q did not answer within 5s\n"


def test_an_os_error_exits_1() -> None:
    result = run_failing("oserror")
    assert result.returncode == 1
    assert result.stderr == (
        "ralph-supervisor: error: [Errno 13] Permission denied: '/var/lib/ralph'\n"
    )


def test_an_interrupt_exits_130() -> None:
    result = run_failing("interrupt")
    assert result.returncode == 130
    assert "Traceback" not in result.stderr


def test_the_console_script_entry_point_is_main() -> None:
    result = run_script(
        """
        from importlib.metadata import entry_points
        (point,) = [p for p in entry_points(group="console_scripts")
                    if p.name == "ralph-supervisor"]
        print(point.value)
        """
    )
    assert result.stdout.strip() == "ralph_supervisor.cli:main"
