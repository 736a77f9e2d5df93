"""Logging: formats, the file and its rotation, and records from workers."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ralph_supervisor import logs
from ralph_supervisor.errors import ConfigError

ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@dataclass
class Settings:
    level: str = "INFO"
    format: str = "json"
    file: str | None = None
    max_bytes: int = 10 * 1024 * 1024
    backup_count: int = 5
    verbose: bool = False
    debug: bool = False


@pytest.fixture(autouse=True)
def _reset_logging():
    yield
    logs.shutdown_logging()


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_json_lines_carry_extras_and_traceback():
    stream = io.StringIO()
    logs.setup_logging(Settings(), stream=stream)
    log = logging.getLogger("ralph_supervisor.test")

    log.info(
        "call finished in %.1f s",
        1.25,
        extra={"request_id": "r-1", "attempt": 2, "worker_pid": 42, "odd": object()},
    )
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.error("call failed", exc_info=True, extra={"error_type": "process_error"})

    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert ISO_UTC_MS.match(first["time"])
    assert first["level"] == "INFO"
    assert first["logger"] == "ralph_supervisor.test"
    assert first["message"] == "call finished in 1.2 s"
    assert first["request_id"] == "r-1"
    assert first["attempt"] == 2
    assert first["worker_pid"] == 42
    assert first["odd"].startswith("<object object")
    assert "traceback" not in first
    assert second["error_type"] == "process_error"
    assert "RuntimeError: boom" in second["traceback"]


def test_text_format_shows_extras_as_key_value():
    stream = io.StringIO()
    logs.setup_logging(Settings(format="text"), stream=stream)

    logging.getLogger("ralph_supervisor.test").warning(
        "worker restarted", extra={"worker_pid": 7, "reason": "killed by signal 9"}
    )

    line = stream.getvalue().strip()
    assert "WARNING" in line
    assert "ralph_supervisor.test: worker restarted" in line
    assert "worker_pid=7" in line
    assert 'reason="killed by signal 9"' in line


def test_the_guides_format_strings_work():
    stream = io.StringIO()
    guide = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
    logs.setup_logging(Settings(format=guide), stream=stream)
    logging.getLogger("ralph_supervisor.test").info("hello")
    assert re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - ralph_supervisor.test - INFO - hello$",
        stream.getvalue().strip(),
    )

    stream = io.StringIO()
    structured = (
        '{"time": "%(asctime)s", "level": "%(levelname)s", '
        '"module": "%(module)s", "message": "%(message)s", "request": "%(request_id)s"}'
    )
    logs.setup_logging(Settings(format=structured), stream=stream)
    logging.getLogger("ralph_supervisor.test").info("hello")
    parsed = json.loads(stream.getvalue())
    assert parsed["message"] == "hello"
    assert parsed["request"] == "-"


def test_a_format_without_fields_is_a_config_error():
    with pytest.raises(ConfigError, match="logging.format"):
        logs.setup_logging(Settings(format="plain words"))


def test_a_bad_level_is_a_config_error():
    with pytest.raises(ConfigError, match="logging.level"):
        logs.setup_logging(Settings(level="LOUD"))


def test_verbose_and_debug_set_the_level_and_prompt_logging():
    logs.setup_logging(Settings(level="WARNING"), stream=io.StringIO())
    assert logging.getLogger("ralph_supervisor").level == logging.WARNING
    assert not logs.prompts_loggable()

    logs.setup_logging(Settings(level="WARNING", verbose=True), stream=io.StringIO())
    assert logging.getLogger("ralph_supervisor").level == logging.INFO
    assert not logs.prompts_loggable()

    logs.setup_logging(Settings(level="ERROR", debug=True), stream=io.StringIO())
    assert logging.getLogger("ralph_supervisor").level == logging.DEBUG
    assert logs.prompts_loggable()


def test_verbose_lines_name_their_source():
    stream = io.StringIO()
    logs.setup_logging(Settings(verbose=True), stream=stream)
    logging.getLogger("ralph_supervisor.test").info("hello")
    assert json.loads(stream.getvalue())["source"].startswith("test_logs:")


def test_file_is_created_with_its_directory(tmp_path):
    path = tmp_path / "var" / "log" / "ralph" / "qchat.log"
    logs.setup_logging(Settings(file=str(path)))
    logging.getLogger("ralph_supervisor.test").info("to the file")
    logs.shutdown_logging()

    [line] = _lines(path)
    assert json.loads(line)["message"] == "to the file"


def test_file_rotates_at_max_bytes_keeping_backup_count(tmp_path):
    path = tmp_path / "qchat.log"
    logs.setup_logging(Settings(file=str(path), max_bytes=2000, backup_count=2))
    log = logging.getLogger("ralph_supervisor.test")

    for number in range(200):
        log.info("line %d %s", number, "x" * 50)
    logs.shutdown_logging()

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["qchat.log", "qchat.log.1", "qchat.log.2"]
    for name in names:
        assert (tmp_path / name).stat().st_size <= 2000
    # The newest line is in the live file, and nothing was cut in half.
    assert json.loads(_lines(path)[-1])["message"].startswith("line 199 ")
    for name in names:
        for line in _lines(tmp_path / name):
            json.loads(line)


def test_an_unwritable_file_is_a_config_error(tmp_path):
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("not a directory")
    path = blocker / "logs" / "qchat.log"

    with pytest.raises(ConfigError) as caught:
        logs.setup_logging(Settings(file=str(path)))

    message = str(caught.value)
    assert message.startswith(f"logging.file: cannot write {path}: ")
    assert "\n" not in message


def test_setup_again_replaces_handlers_without_duplicating(tmp_path):
    path = tmp_path / "qchat.log"
    for _ in range(3):
        logs.setup_logging(Settings(file=str(path)))
    logging.getLogger("ralph_supervisor.test").info("once")
    logs.shutdown_logging()

    assert len(_lines(path)) == 1
    assert logging.getLogger("ralph_supervisor").handlers == []


def test_a_failed_reload_keeps_the_old_logging(tmp_path):
    path = tmp_path / "qchat.log"
    logs.setup_logging(Settings(file=str(path)))
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(ConfigError):
        logs.setup_logging(Settings(file=str(blocker / "x.log")))
    logging.getLogger("ralph_supervisor.test").info("still here")
    logs.shutdown_logging()

    assert json.loads(_lines(path)[-1])["message"] == "still here"


def test_prompt_digest_is_a_short_sha256():
    digest = logs.prompt_digest("fix the tests")
    assert digest == hashlib.sha256(b"fix the tests").hexdigest()[:12]
    assert logs.prompt_digest("\udcff") == logs.prompt_digest("\udcff")


def test_forwarding_handler_drops_records_on_a_broken_pipe():
    def send(data: dict[str, Any]) -> None:
        raise BrokenPipeError

    logger = logging.getLogger("ralph_supervisor.test.broken")
    handler = logs.ForwardingHandler(send)
    logger.addHandler(handler)
    try:
        logger.error("nobody listens")
    finally:
        logger.removeHandler(handler)


def test_record_to_dict_survives_unpicklable_args_and_extras():
    import pickle

    record = logging.LogRecord("ralph_supervisor.x", logging.INFO, __file__, 1, "%s", None, None)
    record.args = (lambda: 1,)
    record.handle = open(__file__)  # noqa: SIM115 (closed below)
    try:
        data = logs.record_to_dict(record)
        assert pickle.loads(pickle.dumps(data))["msg"].startswith("<function")
        assert data["handle"].startswith("<_io.TextIOWrapper")
    finally:
        record.handle.close()


def _child_logs_through_pipe(conn: Any) -> None:
    # Runs in a spawned worker process.
    logs.setup_worker_logging(conn.send, "INFO")
    log = logging.getLogger("ralph_supervisor.worker")
    log.debug("filtered out in the worker")
    log.info("call started", extra={"request_id": "r-9", "agent_pid": 1234})
    try:
        {}["missing"]
    except KeyError:
        log.exception("call crashed")
    conn.send(None)
    conn.close()


def test_forwarded_records_reach_the_parents_file(tmp_path):
    path = tmp_path / "qchat.log"
    logs.setup_logging(Settings(file=str(path)))

    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe(duplex=False)
    child = context.Process(target=_child_logs_through_pipe, args=(child_end,))
    child.start()
    child_end.close()
    try:
        while parent_end.poll(30):
            data = parent_end.recv()
            if data is None:
                break
            logs.handle_forwarded(data)
        else:
            pytest.fail("the child sent nothing within 30 s")
    finally:
        child.join(10)
    logs.shutdown_logging()

    started, crashed = (json.loads(line) for line in _lines(path))
    assert started["message"] == "call started"
    assert started["logger"] == "ralph_supervisor.worker"
    assert started["request_id"] == "r-9"
    assert started["agent_pid"] == 1234
    assert started["worker_pid"] == child.pid
    assert crashed["level"] == "ERROR"
    assert "KeyError: 'missing'" in crashed["traceback"]


def test_handle_forwarded_ignores_a_malformed_record():
    stream = io.StringIO()
    logs.setup_logging(Settings(), stream=stream)
    logs.handle_forwarded({"name": None, "levelno": "loud", "msg": "?"})
    logs.handle_forwarded({"name": "ralph_supervisor.w", "levelno": 20, "msg": "ok"})
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "ok"
