"""Security: no shell, loopback by default, private state, no prompts in logs.

- A prompt is an argv word (or stdin), never shell text: prompts full of
  command substitutions and `rm -rf` create nothing and remove nothing in the
  working directory, and arrive byte for byte.
- The health server listens on 127.0.0.1 unless told otherwise.
- The cache, the breaker and rate-limit stores are readable by their owner
  only, even under a permissive umask.
- Logs carry prompt digests, not prompts, unless logging.debug is on.

The files of `ralph-supervisor start` (checkpoint, pidfile, iteration logs)
are checked in test_crash_consistency.py, which runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from conftest import make_config

from ralph_supervisor.adapter import QChatAdapter
from ralph_supervisor.config import load_config
from ralph_supervisor.errors import QChatServiceError
from ralph_supervisor.server import HealthServer
from ralph_supervisor.supervisor import Supervisor

from .conftest import OWNER_PRELUDE, owner_process, sizes

SHELL_PROMPTS = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "; touch PWNED",
    "&& touch PWNED",
    "|| touch PWNED",
    "| touch PWNED",
    "\ntouch PWNED\n",
    "> PWNED",
    "; rm -rf canary.txt",
    "$(rm -rf .)",
    "`rm -f canary.txt`",
    "'; rm -f canary.txt; echo '",
    '"; rm -f canary.txt; echo "',
    "${IFS}rm${IFS}-f${IFS}canary.txt",
    "* ?",
    "$(printf x > PWNED) and more: $((1+1)) ~ !! #",
]


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(path.rglob("*"))
    }


def sha_answer(prompt: str) -> str:
    data = prompt.encode("utf-8")
    return f"sha256:{hashlib.sha256(data).hexdigest()} bytes:{len(data)}"


@pytest.mark.parametrize("repeat", sizes(1, 5, bounded_timeout=120, full_timeout=300))
def test_prompts_are_never_run_by_a_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repeat: int, report
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "canary.txt").write_text("still here\n")
    before = tree(workdir)
    monkeypatch.chdir(workdir)  # a stray relative path would land here too

    config = make_config(tmp_path, performance__max_concurrent=2, cache__enabled=False)
    adapter = QChatAdapter(config)
    calls = 0
    with Supervisor(config) as supervisor:
        for round_number in range(repeat):
            for index, hostile in enumerate(SHELL_PROMPTS):
                # Through the supervisor's workers, and through the adapter.
                prompt = f"@sim:echo=sha256 {round_number}.{index} {hostile}"
                answer = supervisor.submit(prompt, cwd=str(workdir)).result(timeout=60)
                assert answer.text.strip() == sha_answer(prompt)
                answer = adapter.execute(prompt, cwd=str(workdir))
                assert answer.text.strip() == sha_answer(prompt)
                calls += 2

    after = tree(workdir)
    report(
        "no_shell",
        calls=calls,
        files_created=sorted(set(after) - set(before)),
        files_removed=sorted(set(before) - set(after)),
        canary_intact=after.get("canary.txt") == b"still here\n",
    )
    assert after == before
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("size", sizes(1, 1, bounded_timeout=30, full_timeout=30))
def test_the_health_server_binds_loopback_by_default(size: int, report) -> None:
    config = load_config(env={})
    assert config.monitoring.health_check_host == "127.0.0.1"

    server = HealthServer(
        config.monitoring.health_check_host,
        0,
        snapshot=lambda: {"status": "healthy"},
        metrics=None,
    )
    server.start()
    try:
        host, port = server.address
        bound = server._server.socket.getsockname()  # type: ignore[union-attr]
    finally:
        assert server.stop(timeout=5)
    report("loopback", default_host=config.monitoring.health_check_host, bound=f"{host}:{port}")
    assert host == "127.0.0.1"
    assert bound[0] == "127.0.0.1"


def loose_modes(root: Path) -> list[str]:
    """Paths under root that the group or others may read, write or enter."""
    loose = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077 and not path.is_symlink():
            loose.append(f"{path.relative_to(root.parent)} {oct(mode)}")
    return loose


@pytest.mark.parametrize("size", sizes(1, 1, bounded_timeout=60, full_timeout=60))
def test_cache_breaker_and_ratelimit_state_is_private(tmp_path: Path, size: int, report) -> None:
    state = tmp_path / "state"
    previous = os.umask(0o022)
    try:
        config = make_config(
            tmp_path,
            performance__max_concurrent=1,
            breaker__storage="disk",
            limits__requests_per_minute=6000,
            cache__enabled=True,
        )
        with Supervisor(config) as supervisor:
            # A large answer goes to a value file of its own, not the database.
            big = supervisor.execute("big answer @sim:stdout_bytes=100k")
            small = supervisor.execute("small answer")
            supervisor.execute("small answer")  # a hit
            # A failure the breaker counts, so that it writes its state.
            failed = supervisor.submit("fail @sim:failure=service").exception(timeout=60)
    finally:
        os.umask(previous)

    assert isinstance(failed, QChatServiceError)
    assert big.text and small.text
    stores = {name: (state / name).is_dir() for name in ("cache", "breaker", "ratelimit")}
    files = sum(1 for p in state.rglob("*") if p.is_file())
    loose = loose_modes(state)
    report("private_state", stores=stores, files=files, group_or_other_access=loose)
    assert all(stores.values()), stores
    assert not loose, loose


LOGGING_OWNER = (
    OWNER_PRELUDE
    + """
from ralph_supervisor.logs import setup_logging
from ralph_supervisor.supervisor import Supervisor

SECRET = sys.argv[2]

def main():
    level, debug = sys.argv[3], sys.argv[4] == "1"
    config = make_config(
        Path(sys.argv[1]),
        performance__max_concurrent=2,
        cache__enabled=True,
        adapter__max_retries=1,
        logging__level=level,
        logging__debug=debug,
        logging__format="json",
        security__blocked_patterns=["FORBIDDEN"],
    )
    setup_logging(config.logging)
    with Supervisor(config) as supervisor:
        calls = [
            f"{SECRET} a plain call",
            f"{SECRET} a crash @sim:exit=3",
            f"{SECRET} throttled @sim:failure=throttled",
            f"{SECRET} a timeout @sim:latency=5",
            f"{SECRET} FORBIDDEN",
            f"{SECRET} a plain call",
        ]
        for prompt in calls:
            future = supervisor.submit(prompt, timeout=2)
            future.exception(timeout=60)
    print("done", flush=True)

if __name__ == "__main__":
    main()
"""
)


@pytest.mark.parametrize("size", sizes(1, 1, bounded_timeout=120, full_timeout=120))
def test_prompts_stay_out_of_logs_unless_debugging(tmp_path: Path, size: int, report) -> None:
    script = tmp_path / "owner.py"
    script.write_text(LOGGING_OWNER)
    secret = "ZEBRA-" + os.urandom(6).hex() + "-PROMPT"
    seen = {}
    lines = {}
    modes = [("info", "INFO", "0"), ("level_debug", "DEBUG", "0"), ("debug", "DEBUG", "1")]
    for mode, level, debug in modes:
        workdir = tmp_path / mode
        workdir.mkdir()
        with owner_process(script, str(workdir), secret, level, debug) as owner:
            assert owner.wait(timeout=90) == 0, owner.stderr_text
        log_lines = [line for line in owner.stderr if line.startswith("{")]
        for line in log_lines:
            json.loads(line)  # every line is JSON
        lines[mode] = len(log_lines)
        seen[mode] = sum(1 for line in owner.stderr if secret in line)

    report(
        "prompts_in_logs",
        log_lines=lines,
        lines_with_prompt=seen,
        debug_logs_prompts=seen["debug"] > 0,
    )
    assert lines["info"] > 0 and lines["level_debug"] > lines["info"]
    assert seen["info"] == 0
    assert seen["level_debug"] == 0
