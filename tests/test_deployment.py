"""The deployment files in config/, checked by their own tools and run for real.

probe      config/healthcheck.py and the HEALTHCHECK commands of the
           Dockerfile, docker-compose.yml and docs/deployment.md, run as
           processes against a real HealthServer: healthy, unhealthy,
           nothing listening, a server that never answers
commands   every `ralph-supervisor start` line in the unit, the program
           section, the Dockerfile and the docs, through `start --dry-run`
settings   every QCHAT_* variable named, against the schema and with its
           value; every stop timeout, against the drain it must cover
tools      promtool (rules, config, and each alert firing on series named
           as metrics.py names them), systemd-analyze verify and
           security, supervisord stopping a real `start` with a drain;
           each skipped, with the reason, where the tool is missing
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families

from ralph_supervisor.config import SETTINGS, load_config, schema_rows
from ralph_supervisor.metrics import Metrics
from ralph_supervisor.server import HealthServer

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config"
UNIT = CONFIG / "ralph-supervisor.service"
DOCKERFILE = CONFIG / "Dockerfile"
COMPOSE = CONFIG / "docker-compose.yml"
SUPERVISORD = CONFIG / "supervisord.conf"
PROMETHEUS = CONFIG / "prometheus.yml"
ALERTS = CONFIG / "alerts.yml"
PROBE = CONFIG / "healthcheck.py"
DOCS = REPO / "docs" / "deployment.md"

# Where the files expect things on a real host, and what stands in here.
INSTALLED_BINARY = "/opt/ralph-supervisor/bin/ralph-supervisor"
INSTALLED_CONFIG = "/etc/ralph/qchat.yaml"
IMAGE_CONFIG_DIR = "/app/config/"

# Every probe must finish well within this, or the test fails, not hangs.
PROBE_DEADLINE_S = 15.0

# How long a stop may take at most: the drain, then the workers' grace.
DRAIN_S = SETTINGS["supervisor.drain_timeout"].default + SETTINGS["adapter.kill_grace"].default

SCHEMA_VARIABLES = {row.env for row in schema_rows() if row.env}

# The files that name environment variables for an operator to set.
FILES_WITH_VARIABLES = (UNIT, DOCKERFILE, COMPOSE, SUPERVISORD, PROBE, DOCS)


# ---------------------------------------------------------------------------
# Reading the files


def read_unit(path: Path = UNIT) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines are not read here: {line}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"a setting before any section: {line}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(key: str, section: str = "Service") -> list[str]:
    return [value for name, value in read_unit()[section] if name == key]


def unit_value(key: str, section: str = "Service") -> str:
    values = unit_values(key, section)
    assert len(values) == 1, f"{key}= appears {len(values)} times in [{section}]"
    return values[0]


def unit_environment() -> dict[str, str]:
    env = {}
    for value in unit_values("Environment"):
        for word in shlex.split(value):
            name, _, setting = word.partition("=")
            env[name] = setting
    return env


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""

    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages[-1]


def dockerfile_values(instruction: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == instruction]


def dockerfile_environment() -> dict[str, str]:
    env = {}
    for arguments in dockerfile_values("ENV"):
        for word in shlex.split(arguments):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def dockerfile_healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's --options and its exec-form command."""
    (arguments,) = dockerfile_values("HEALTHCHECK")
    options_text, _, command = arguments.partition(" CMD ")
    options = {}
    for word in options_text.split():
        name, _, value = word.partition("=")
        options[name] = value
    argv = json.loads(command)
    assert isinstance(argv, list), "use the exec form: CMD [...], no shell needed"
    return options, argv


def compose_service() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    (service,) = document["services"].values()
    return service


def compose_environment() -> dict[str, str]:
    env = {}
    for item in compose_service()["environment"]:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def supervisord_program() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SUPERVISORD)
    (name,) = [s for s in parser.sections() if s.startswith("program:")]
    return parser[name]


def supervisord_environment() -> dict[str, str]:
    text = supervisord_program()["environment"]
    assert re.fullmatch(r'(\w+="[^"]*",?)+', text), f'not KEY="value",...: {text}'
    return dict(re.findall(r'(\w+)="([^"]*)"', text))


def docs_blocks(language: str) -> list[str]:
    text = DOCS.read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def docs_commands(program: str) -> list[list[str]]:
    """Every command line in the docs' bash blocks that runs `program`."""
    commands = []
    for block in docs_blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == program.split():
                commands.append(words)
    return commands


def seconds(text: str) -> float:
    """A duration as systemd, supervisord or Compose write it: 60, 60s, 1m."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?", str(text).strip())
    assert match, f"not a duration: {text!r}"
    scale = {"ms": 0.001, "s": 1, "min": 60, "m": 60, "h": 3600}[match.group(2) or "s"]
    return float(match.group(1)) * scale


# ---------------------------------------------------------------------------
# The probe against a real health server


class Snapshot:
    """The snapshot callable the HealthServer asks; the test sets its status."""

    def __init__(self) -> None:
        self.status = "healthy"
        self.reasons: list[str] = []

    def __call__(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": self.reasons, "adapter": "q"}

    def fail(self, reason: str) -> None:
        self.status = "unhealthy"
        self.reasons = [reason]


@pytest.fixture
def snapshot() -> Snapshot:
    return Snapshot()


@pytest.fixture
def server(snapshot: Snapshot) -> Iterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0, snapshot=snapshot, metrics=None)
    server.start()
    yield server
    assert server.stop(timeout=5)


def probe_env(**variables: str) -> dict[str, str]:
    """The test's environment without the health variables, plus `variables`.

    A proxy that nothing answers is set too: a probe that honoured it would
    fail, and the health endpoint is never reached through a proxy.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QCHAT_", "HEALTH_CHECK_"))}
    env.update(HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    env.update(variables)
    return env


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PROBE_DEADLINE_S,
    )


def in_image(argv: list[str]) -> list[str]:
    """A command written for the image, pointed at this checkout and Python."""
    words = [sys.executable if word == "python" else word for word in argv]
    return [word.replace(IMAGE_CONFIG_DIR, f"{CONFIG}/") for word in words]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_probe_exits_0_when_healthy_then_1_when_unhealthy(
    server: HealthServer, snapshot: Snapshot
) -> None:
    argv = [sys.executable, str(PROBE), "--port", str(server.address[1])]

    healthy = run(argv, probe_env())
    assert healthy.returncode == 0, healthy
    assert healthy.stdout.startswith("healthy: HTTP 200")

    snapshot.fail("no worker is alive")
    unhealthy = run(argv, probe_env())
    assert unhealthy.returncode == 1, unhealthy
    assert "HTTP 503" in unhealthy.stdout
    assert "no worker is alive" in unhealthy.stdout


def test_probe_reads_the_servers_own_variables(server: HealthServer) -> None:
    # The server in a container listens on 0.0.0.0; the probe asks loopback.
    env = probe_env(QCHAT_HEALTH_HOST="0.0.0.0", QCHAT_HEALTH_PORT=str(server.address[1]))
    result = run([sys.executable, str(PROBE)], env)
    assert result.returncode == 0, result
    assert "http://127.0.0.1:" in result.stdout


def test_probe_fails_fast_when_nothing_listens() -> None:
    started = time.monotonic()
    result = run([sys.executable, str(PROBE), "--port", str(free_port())], probe_env())
    assert result.returncode == 1, result
    assert time.monotonic() - started < 3.0
    assert "refused" in result.stdout.lower()


def test_probe_gives_up_on_a_server_that_never_answers() -> None:
    with socket.socket() as silent:
        # Connections complete in the backlog and are never accepted.
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]

        started = time.monotonic()
        argv = [sys.executable, str(PROBE), "--port", str(port), "--timeout", "0.5"]
        result = run(argv, probe_env())
        elapsed = time.monotonic() - started

    assert result.returncode == 1, result
    assert "no answer" in result.stdout
    assert elapsed < 3.0


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["--port", "0"], ["--port", "eighty"], ["--timeout", "0"]],
)
def test_probe_never_exits_2_which_docker_reserves(argv: list[str]) -> None:
    result = run([sys.executable, str(PROBE), *argv], probe_env())
    assert result.returncode == 1, result


def test_probe_asks_loopback_for_a_wildcard_host() -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", PROBE)
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)

    assert probe.probe_address("0.0.0.0", "8080") == ("127.0.0.1", 8080)
    assert probe.probe_address("::", 9000) == ("::1", 9000)
    assert probe.probe_address("[::1]", None)[0] == "::1"
    assert probe.probe_address("10.1.2.3", "81") == ("10.1.2.3", 81)


def test_dockerfile_healthcheck_runs_for_real(server: HealthServer, snapshot: Snapshot) -> None:
    options, argv = dockerfile_healthcheck()
    assert argv == ["python", "/app/config/healthcheck.py"]

    # Docker must not kill the probe before its own timeout answers.
    assert seconds(options["--timeout"]) > 5.0
    assert seconds(options["--start-period"]) >= 10.0

    # The image's environment, but the port this test's server has.
    env = probe_env(**dockerfile_environment())
    assert env["QCHAT_HEALTH_HOST"] == "0.0.0.0", "a published port needs the wildcard"
    env["QCHAT_HEALTH_PORT"] = str(server.address[1])

    assert run(in_image(argv), env).returncode == 0
    snapshot.fail("shutting down")
    assert run(in_image(argv), env).returncode == 1


def test_compose_healthcheck_runs_for_real(server: HealthServer, snapshot: Snapshot) -> None:
    check = compose_service()["healthcheck"]
    kind, *argv = check["test"]
    assert kind == "CMD"
    assert seconds(check["timeout"]) > 5.0

    env = probe_env(**compose_environment())
    assert env["QCHAT_HEALTH_HOST"] == "0.0.0.0"
    env["QCHAT_HEALTH_PORT"] = str(server.address[1])

    assert run(in_image(argv), env).returncode == 0
    snapshot.fail("the circuit breaker is open")
    assert run(in_image(argv), env).returncode == 1


def test_documented_python_c_healthcheck_runs_for_real(
    server: HealthServer, snapshot: Snapshot
) -> None:
    commands = []
    for block in docs_blocks("dockerfile"):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += re.findall(r"HEALTHCHECK .*? CMD (.+)", joined)
    assert commands, "docs/deployment.md shows a HEALTHCHECK for the guide's image"

    for command in commands:
        argv = in_image(shlex.split(command))
        assert "127.0.0.1:8080" in " ".join(argv)
        here = [word.replace(":8080", f":{server.address[1]}") for word in argv]
        nowhere = [word.replace(":8080", f":{free_port()}") for word in argv]

        snapshot.status = "healthy"
        assert run(here, probe_env()).returncode == 0
        snapshot.fail("starting: workers not up yet")
        assert run(here, probe_env()).returncode == 1
        assert run(nowhere, probe_env()).returncode == 1


# ---------------------------------------------------------------------------
# Command lines, through `start --dry-run`


def dry_run(argv: list[str], env: dict[str, str], tmp_path: Path) -> None:
    """Run `start` with argv and --dry-run; host paths are moved into tmp_path."""
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    (workdir / "PROMPT.md").write_text("Do the task.\n")

    # A q that `start` finds on PATH; --dry-run only looks for it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_q = bin_dir / "q"
    fake_q.write_text("#!/bin/sh\nexit 0\n")
    fake_q.chmod(0o755)

    assert argv[0] in ("ralph-supervisor", INSTALLED_BINARY), argv
    words = [
        str(CONFIG / "qchat.yaml") if word in (INSTALLED_CONFIG, "config/qchat.yaml") else word
        for word in argv[1:]
    ]
    words = [word.replace("/var/log/ralph/", f"{tmp_path}/log/") for word in words]
    command = [sys.executable, "-m", "ralph_supervisor", *words]
    command += ["--workdir", str(workdir), "--dry-run"]

    env = {**probe_env(), **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr}"
    assert "the configuration is valid" in result.stdout


def test_unit_command_line_starts(tmp_path: Path) -> None:
    argv = shlex.split(unit_value("ExecStart"))
    assert argv[0] == INSTALLED_BINARY
    assert argv[1] == "start"
    dry_run(argv, unit_environment(), tmp_path)


def test_supervisord_command_line_starts(tmp_path: Path) -> None:
    program = supervisord_program()
    argv = shlex.split(program["command"])
    assert argv[:2] == [INSTALLED_BINARY, "start"]
    assert argv == shlex.split(unit_value("ExecStart")), "the same command as the unit"
    dry_run(argv, supervisord_environment(), tmp_path)


def test_dockerfile_command_line_starts(tmp_path: Path) -> None:
    (entrypoint,) = dockerfile_values("ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--"]
    (cmd,) = dockerfile_values("CMD")
    argv = json.loads(cmd)
    argv = [str(CONFIG / "qchat.yaml") if w == "/app/config/qchat.yaml" else w for w in argv]
    dry_run(argv, dockerfile_environment(), tmp_path)


def test_documented_command_lines_start(tmp_path: Path) -> None:
    commands = docs_commands("ralph-supervisor start")
    # The guide's deploy-qchat.sh and its debug run, at least.
    guide = [
        "ralph-supervisor",
        "start",
        "--agent",
        "q",
        "--config",
        "config/qchat.yaml",
        "--checkpoint-interval",
        "10",
        "--max-iterations",
        "1000",
        "--metrics-interval",
        "60",
        "--log-file",
        "/var/log/ralph/orchestrator.log",
    ]
    assert guide in commands
    assert len(commands) >= 2
    for argv in commands:
        dry_run(argv, {"QCHAT_TIMEOUT": "300", "QCHAT_VERBOSE": "1"}, tmp_path)


# ---------------------------------------------------------------------------
# Settings: the variables named, and the timeouts


def test_every_variable_named_is_in_the_configuration_schema() -> None:
    for path in FILES_WITH_VARIABLES:
        named = set(re.findall(r"\b(?:QCHAT|HEALTH_CHECK)_[A-Z0-9_]+\b", path.read_text()))
        unknown = sorted(named - SCHEMA_VARIABLES)
        assert not unknown, f"{path.name} names variables the configuration ignores: {unknown}"


@pytest.mark.parametrize(
    "source",
    [unit_environment, dockerfile_environment, compose_environment, supervisord_environment],
)
def test_variables_set_are_valid_with_the_shipped_config(source: Any) -> None:
    env = {k: v for k, v in source().items() if k.startswith(("QCHAT_", "HEALTH_CHECK_"))}
    assert env, f"{source.__name__} sets no QCHAT_* variable"
    config = load_config(CONFIG / "qchat.yaml", env=env)
    for name in env:
        assert any(config.sources[key] == f"env {name}" for key in SETTINGS), name


def test_stop_timeouts_cover_the_drain() -> None:
    assert seconds(unit_value("TimeoutStopSec")) > DRAIN_S
    assert seconds(supervisord_program()["stopwaitsecs"]) > DRAIN_S
    assert seconds(compose_service()["stop_grace_period"]) > DRAIN_S


def test_the_container_listens_on_every_interface() -> None:
    assert dockerfile_environment()["QCHAT_HEALTH_HOST"] == "0.0.0.0"
    assert compose_environment()["QCHAT_HEALTH_HOST"] == "0.0.0.0"
    port = SETTINGS["monitoring.health_check_port"].default
    assert dockerfile_values("EXPOSE") == [str(port)]
    assert any(mapping.endswith(f":{port}") for mapping in compose_service()["ports"])


# ---------------------------------------------------------------------------
# The systemd unit


def test_unit_has_the_service_settings() -> None:
    assert unit_value("Type") == "notify"
    assert unit_value("NotifyAccess") == "main"
    assert seconds(unit_value("WatchdogSec")) > 0
    assert unit_value("Restart") == "on-failure"
    assert unit_value("KillMode") == "mixed"
    assert unit_value("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit_value("User") not in ("", "root")
    for key in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert unit_value(key) == "yes", key
    assert unit_value("ProtectSystem") == "strict"
    assert set(unit_value("RestartPreventExitStatus").split()) == {"2", "3"}


def test_unit_may_write_where_start_writes() -> None:
    writable = [
        Path(p.lstrip("-")) for value in unit_values("ReadWritePaths") for p in value.split()
    ]
    argv = shlex.split(unit_value("ExecStart"))
    log_file = Path(argv[argv.index("--log-file") + 1])
    # The state directory is WORKDIR/.ralph; HOME holds q's login.
    for path in (Path(unit_value("WorkingDirectory")), log_file, Path(unit_environment()["HOME"])):
        assert any(path.is_relative_to(root) for root in writable), path


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def unit_for_this_host(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart= on this checkout's Python: verify wants a binary."""
    text = UNIT.read_text() if text is None else text
    here = f"{sys.executable} -m ralph_supervisor"
    path = tmp_path / UNIT.name
    path.write_text(text.replace(INSTALLED_BINARY, here))
    return path


def verify_complaints(tmp_path: Path, unit: Path) -> list[str]:
    """Lines of `systemd-analyze verify` that a control unit does not get too.

    The control unit has the same user and paths and nothing else, so what
    it draws (a missing user, directory or manager) is this host's, not ours.
    """
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")

    control_dir = tmp_path / "control"
    control_dir.mkdir(exist_ok=True)
    control = control_dir / unit.name
    control.write_text(
        "[Unit]\nDescription=control\n\n[Service]\nType=notify\n"
        f"User={unit_value('User')}\nExecStart=/bin/true\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    baseline = systemd_analyze("verify", "--man=no", str(control))
    if baseline.returncode != 0 and "ExecStart" not in baseline.stderr:
        pytest.skip(f"systemd-analyze verify is not usable here: {baseline.stderr.strip()}")
    environmental = {line.replace(str(control), "UNIT") for line in baseline.stderr.splitlines()}

    result = systemd_analyze("verify", "--man=no", str(unit))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return [line for line in lines if line.replace(str(unit), "UNIT") not in environmental]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    assert verify_complaints(tmp_path, unit_for_this_host(tmp_path)) == []


def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHom=yes")
    complaints = verify_complaints(tmp_path, unit_for_this_host(tmp_path, broken))
    assert any("ProtectHom" in line for line in complaints), complaints


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = unit_for_this_host(tmp_path)
    result = systemd_analyze("security", "--offline=yes", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline is not supported: {result.stderr}")
    assert float(match.group(1)) < 3.0, result.stdout[-2000:]


# ---------------------------------------------------------------------------
# supervisord


def test_supervisord_section_has_the_stop_settings() -> None:
    program = supervisord_program()
    assert program.name == "program:ralph-qchat", "the guide's `supervisorctl start ralph-qchat`"
    assert program["stopsignal"] == "TERM"
    assert program["autorestart"] in ("true", "unexpected")
    # SIGTERM to the main process alone (see the drain test below); SIGKILL
    # to the whole group when the drain overruns.
    assert program["stopasgroup"] == "false"
    assert program["killasgroup"] == "true"
    assert set(program["exitcodes"].split(",")) == {"0", "2", "3"}


@pytest.mark.slow
def test_supervisorctl_stop_drains_the_call_in_flight(tmp_path: Path) -> None:
    supervisord = shutil.which("supervisord")
    supervisorctl = shutil.which("supervisorctl")
    if supervisord is None or supervisorctl is None:
        pytest.skip("supervisord is not installed (Debian package supervisor)")

    workdir = tmp_path / "work"
    workdir.mkdir()
    subprocess.run(["git", "init", "-q", str(workdir)], check=True)
    (workdir / "PROMPT.md").write_text("Do the task.\n")
    log_file = tmp_path / "log" / "orchestrator.log"
    conf = _supervisord_conf(tmp_path, workdir, log_file)

    daemon = subprocess.Popen(
        [supervisord, "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        health_file = workdir / ".ralph" / "health.json"
        assert wait_until(health_file.exists, timeout=20), _tail(tmp_path / "supervisord.log")
        url = json.loads(health_file.read_text())["url"]
        assert wait_until(lambda: _in_flight(url) > 0, timeout=10), "no call started"

        stop = subprocess.run(
            [supervisorctl, "-c", str(conf), "stop", "ralph-qchat"],
            capture_output=True,
            text=True,
            timeout=DRAIN_S + 30,
        )
        assert "stopped" in stop.stdout, stop
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()

    events = (tmp_path / "supervisord.log").read_text()
    assert "stopped: ralph-qchat (exit status 0)" in events, events

    records = [json.loads(line) for line in log_file.read_text().splitlines() if line]
    errors = [r["message"] for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert not errors, errors  # a worker killed mid-call logs "worker ... died"
    signalled = next(i for i, r in enumerate(records) if "SIGTERM" in r["message"])
    assert any(r.get("outcome") == "success" for r in records[signalled:]), records[signalled:]


def _supervisord_conf(tmp_path: Path, workdir: Path, log_file: Path) -> Path:
    """A supervisord for this test, with our program section run on the simulator."""
    program = supervisord_program()
    argv = shlex.split(program["command"])
    argv[argv.index("--agent") + 1] = "sim"
    argv[argv.index("--config") + 1] = str(CONFIG / "qchat.yaml")
    argv[argv.index("--log-file") + 1] = str(log_file)
    argv[:1] = [sys.executable, "-m", "ralph_supervisor"]
    argv += ["--health-port", "0"]

    env = supervisord_environment()
    env.update(
        HOME=str(tmp_path),
        QCHAT_SIM_LATENCY="1.5",
        QCHAT_MAX_CONCURRENT="2",
        PATH=f"{env['PATH']}:{os.environ['PATH']}",
    )

    settings = dict(program)
    settings.pop("user")  # no such user here
    settings.update(
        command=shlex.join(argv),
        directory=str(workdir),
        environment=",".join(f'{k}="{v}"' for k, v in env.items()),
        stdout_logfile=str(tmp_path / "program.log"),
    )

    socket_path = tmp_path / "supervisor.sock"
    lines = [
        "[unix_http_server]",
        f"file={socket_path}",
        "[supervisord]",
        "nodaemon=true",
        f"logfile={tmp_path / 'supervisord.log'}",
        f"pidfile={tmp_path / 'supervisord.pid'}",
        f"childlogdir={tmp_path}",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "[supervisorctl]",
        f"serverurl=unix://{socket_path}",
        f"[{program.name}]",
        *(f"{key}={value}" for key, value in settings.items()),
    ]
    conf = tmp_path / "supervisord.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _in_flight(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/health/detailed", timeout=2) as reply:
            return int(json.loads(reply.read())["queue"]["in_flight"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else f"{path} is missing"


# ---------------------------------------------------------------------------
# Prometheus


def exposition() -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, from a real Metrics after one of each event."""
    metrics = Metrics()
    metrics.observe_request("q", "success", 0.4)
    metrics.observe_request("q", "throttled", 2.0, error_type="throttled")
    metrics.set_active(1)
    metrics.cache_hit()
    metrics.cache_miss()
    metrics.breaker_transition("q", "open")
    metrics.worker_restarted()
    metrics.workers_alive(5)
    metrics.worker_memory(0, 25_000_000)
    metrics.queue_length(0)
    metrics.ratelimit_waited("q", 1.0)
    metrics.retried("q")
    metrics.loop_iteration("task", "success")
    metrics.checkpoint("task")

    body, _ = metrics.render()
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("path", [PROMETHEUS, ALERTS, COMPOSE, CONFIG / "qchat.yaml"])
def test_yaml_files_parse(path: Path) -> None:
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_prometheus_scrapes_the_health_server_and_loads_the_rules() -> None:
    document = yaml.safe_load(PROMETHEUS.read_text())
    assert [CONFIG / name for name in document["rule_files"]] == [ALERTS]
    (job,) = document["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    host = SETTINGS["monitoring.health_check_host"].default
    port = SETTINGS["monitoring.health_check_port"].default
    assert job["static_configs"][0]["targets"] == [f"{host}:{port}"]


def test_every_series_named_is_one_metrics_py_exports() -> None:
    exported = set(exposition())
    # docs name histograms by their family name: qchat_request_duration_seconds.
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in exported}
    for path in (ALERTS, PROMETHEUS, DOCS):
        named = set(re.findall(r"\b(?:qchat|ralph)_[a-z_]+\b", path.read_text()))
        named -= {"ralph_supervisor", "ralph_orchestrator"}  # packages, in prose
        unknown = sorted(name for name in named if name not in exported | families)
        assert not unknown, f"{path.name} names series metrics.py does not export: {unknown}"

    alerts = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert "qchat_breaker_state == 2" in alerts["QChatBreakerOpen"]
    assert "rate(qchat_worker_restarts_total" in alerts["QChatWorkerRestartStorm"]
    assert "qchat_errors_total" in alerts["QChatHighErrorRate"]
    assert "qchat_requests_total" in alerts["QChatHighErrorRate"]
    assert "histogram_quantile(0.99" in alerts["QChatSlowRequests"]
    assert "qchat_request_duration_seconds_bucket" in alerts["QChatSlowRequests"]
    assert "qchat_workers_alive == 0" in alerts["QChatNoLiveWorkers"]
    assert all(rule.get("for") for rule in alert_rules())


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_checks_the_scrape_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_on_series_as_metrics_py_writes_them(tmp_path: Path) -> None:
    # Annotations are templates checked by `check rules`; left out here, the
    # expected alerts need only their labels.
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(document))

    tests = tmp_path / "alerts_test.yml"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(rules)],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", **_alert_cases(exposition())}],
            }
        )
    )
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_cases(samples: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    """Input series on instances a (should fire) and b (should not), and the
    alerts expected, with label sets taken from the real exposition."""
    job = "ralph-supervisor"
    series: list[dict[str, str]] = []

    def add(name: str, instance: str, values: str, **extra: str) -> dict[str, str]:
        labels = {**samples[name][0], **extra, "instance": instance, "job": job}
        text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series.append({"series": f"{name}{{{text}}}", "values": values})
        return {k: v for k, v in labels.items() if k != "le"}

    def where(instance: str, **labels: str) -> dict[str, str]:
        return {"instance": instance, "job": job, **labels}

    # up is Prometheus' own series, one per target.
    series.append({"series": f'up{{instance="a",job="{job}"}}', "values": "1 1 0x20"})
    series.append({"series": f'up{{instance="b",job="{job}"}}', "values": "1x20"})
    add("qchat_workers_alive", "a", "5 5 0x20")
    add("qchat_workers_alive", "b", "5x20")
    breaker = add("qchat_breaker_state", "a", "0 0 2x20")
    add("qchat_breaker_state", "b", "1x20")  # half-open: a trial is running
    add("qchat_worker_restarts_total", "a", "0+3x40")
    add("qchat_worker_restarts_total", "b", "0+0.5x40")
    add("qchat_requests_total", "a", "0+10x60")
    add("qchat_errors_total", "a", "0+2x60")  # 20% fail
    add("qchat_requests_total", "b", "0+10x60")
    add("qchat_errors_total", "b", "0+0.5x60")  # 5% fail
    bucket = "qchat_request_duration_seconds_bucket"
    for le in ("60.0", "120.0", "300.0", "600.0", "+Inf"):
        # a: every call between 120 s and 300 s; b: every call under 60 s.
        add(bucket, "a", "0x60" if le in ("60.0", "120.0") else "0+1x60", le=le)
        add(bucket, "b", "0+1x60", le=le)

    critical = {"severity": "critical"}
    warning = {"severity": "warning"}
    cases = [
        ("RalphSupervisorDown", "3m", []),
        ("RalphSupervisorDown", "6m", [where("a", **critical)]),
        ("QChatNoLiveWorkers", "2m", []),
        ("QChatNoLiveWorkers", "5m", [where("a", **critical)]),
        ("QChatBreakerOpen", "5m", []),
        ("QChatBreakerOpen", "9m", [{**breaker, **warning}]),
        ("QChatWorkerRestartStorm", "3m", []),
        ("QChatWorkerRestartStorm", "20m", [where("a", **warning)]),
        ("QChatHighErrorRate", "5m", []),
        ("QChatHighErrorRate", "40m", [where("a", **warning)]),
        ("QChatSlowRequests", "10m", []),
        ("QChatSlowRequests", "40m", [where("a", **warning)]),
    ]
    return {
        "input_series": series,
        "alert_rule_test": [
            {
                "eval_time": at,
                "alertname": name,
                "exp_alerts": [{"exp_labels": labels} for labels in expected],
            }
            for name, at, expected in cases
        ],
    }
