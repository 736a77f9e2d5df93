"""qchat-sim: the stand-in for `q chat --no-interactive` in the quick start, tests and bench.

It owns no part of the supervisor. It behaves like the Amazon Q Developer CLI as seen
from outside, and misbehaves on demand: latency, output volume, exit codes, deaths by
signal, hangs, grandchildren that hold the pipes, q's failure messages (with exit 0),
resident memory, and a Ralph loop agent that ticks a PROMPT.md checklist.

    caller (runner)                 the simulator's process group
    ---------------                 ---------------------------------------------------
    argv word ------+
                    +-> prompt ---> qchat-sim --- answer ----------------> stdout
    stdin to EOF ---+                 |       --- chatter, ANSI colour --> stderr
                                      |       --- ticks one "- [ ]" -----> PROMPT.md
                                      +-fork-> grandchild: sleeps, holds stdout and stderr
                                      +-fork-> memory child: holds N MiB, stdio on /dev/null,
                                               ends when qchat-sim ends (its pipe reads EOF)

Knobs come from QCHAT_SIM_<KEY> environment variables and from `@sim:key=value`
directives in the prompt; a directive overrides the variable. A bad knob exits 2 with
one line on stderr. docs/simulator.md documents every knob.

Every test and benchmark call starts this module, so its start-up is kept lean: the
top imports only modules that are built in or loaded at every start (math, os, sys,
time); hashlib, random, signal, resource and difflib load only when a knob needs them,
and `re` is not used at all.
"""

from __future__ import annotations

import math
import os
import sys
import time

# typing costs milliseconds at every start; mypy treats a TYPE_CHECKING name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Mapping
    from typing import TypeVar

    T = TypeVar("T")

ENV_PREFIX = "QCHAT_SIM_"
DIRECTIVE = "@sim:"
MIB = 1024 * 1024
CHUNK = MIB

EXIT_USAGE = 2

KNOBS = (
    "profile",
    "latency",
    "latency_max",
    "seed",
    "chatter",
    "stdout_bytes",
    "stderr_bytes",
    "exit",
    "signal",
    "hang",
    "ignore_sigterm",
    "grandchild",
    "failure",
    "memory_mb",
    "child_memory_mb",
    "echo",
    "crash_rate",
    "hang_rate",
    "throttle_rate",
    "count_file",
    "loop",
    "prompt_file",
    "promise",
    "stall",
    "repeat",
    "work_dir",
    "ansi_stdout",
    "stdin",
)

# profile: (latency, latency_max, answer style). A latency is (kind, a, b).
# simple: lognormal, median 0.3 s, p99 about 0.54 s.
# complex: lognormal, median 1.2 s, p99 about 1.70 s, never above 1.9 s.
PROFILES: dict[str, tuple[tuple[str, float, float], float | None, str]] = {
    "default": (("fixed", 0.05, 0.0), None, "normal"),
    "simple": (("lognormal", 0.3, 0.25), None, "short"),
    "complex": (("lognormal", 1.2, 0.15), 1.9, "long"),
    "instant": (("fixed", 0.0, 0.0), None, "minimal"),
}

# q's failure messages: name -> (kind, text). q prints them on stderr and exits 0.
# The phrases of one kind never appear in another, so a classifier can tell them apart.
# Colour marks: {r} red bold, {y} yellow bold, {b} bold, {o} reset.
FAILURES = {
    "rate_limit": (
        "throttled",
        "{r}error{o}: rate limit reached. Please wait a moment and try again.\n",
    ),
    "quota": (
        "throttled",
        "{r}Request quota exceeded{o}: quota has reached its limit."
        " Please wait a moment and try again.\n",
    ),
    "throttling_exception": (
        "throttled",
        "{r}error{o}: ThrottlingException: Too many requests,"
        " please wait before trying again (status code: 429)\n",
    ),
    "monthly_limit": (
        "throttled",
        "{y}Monthly request limit reached{o}\nThe limits reset on {reset_on}.\n",
    ),
    "not_logged_in": (
        "auth",
        "{r}error{o}: You are not logged in, please log in with {b}q login{o}\n",
    ),
    "auth_error": (
        "auth",
        "{r}Authentication Error{o}: the bearer token included in the request is"
        " invalid or expired. Run {b}q login{o} and try again.\n",
    ),
    "trouble": (
        "service",
        "{r}Amazon Q is having trouble responding right now{o}:\n"
        "   0: dispatch failure (io error): connection closed before message completed\n",
    ),
    "unavailable": (
        "service",
        "{r}error{o}: service temporarily unavailable (status code: 503)."
        " Please try again later.\n",
    ),
}
FAILURE_KINDS = {"throttled": "rate_limit", "auth": "not_logged_in", "service": "trouble"}
THROTTLED = [name for name, (kind, _) in FAILURES.items() if kind == "throttled"]

# Fatal by default. The others are ignored or stop the process, which would not end it.
NOT_FATAL = (
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGWINCH",
)

COLOURS = {"r": "\x1b[1m\x1b[31m", "y": "\x1b[1m\x1b[33m", "b": "\x1b[1m", "o": "\x1b[0m"}
NO_COLOURS = dict.fromkeys(COLOURS, "")

STEPS = (
    "read the files the task names and note what each one owns",
    "write a failing test that pins down the expected behaviour",
    "make the smallest change that makes the test pass",
    "run the linters and the whole test suite",
    "update the documentation where the behaviour changed",
    "check the edge cases: empty input, very large input, non-ASCII text",
    "remove the code the change made dead",
    "commit the change with a message that says why",
)

FILLER_LINE = b"qchat-sim filler: the quick brown fox jumps over the lazy dog 0123456789\n"

USAGE = """\
usage: qchat-sim [chat] [--no-interactive] [--trust-all-tools] [--model M] [PROMPT]

A stand-in for `q chat`. The prompt is the last positional word; without one it is
read from stdin to EOF (with one, a stdin that is not a terminal is appended, as q
does). The answer goes to stdout, chatter to stderr. Unknown --flags are ignored.

Knobs: QCHAT_SIM_<KEY>=VALUE in the environment, or @sim:key=value in the prompt.
Keys: {keys}.
See docs/simulator.md.
"""


class SimError(Exception):
    """A call that cannot go on: print one line and exit with `code`."""

    code = 1


class KnobError(SimError):
    """A bad knob, directive or command line."""

    code = EXIT_USAGE


# -- command line -------------------------------------------------------------------------

VALUE_FLAGS = ("--model", "--agent", "--profile", "--trust-tools")


class CommandLine:
    """What q's command line asks for: help, version, model and the prompt word."""

    def __init__(self, argv: list[str]) -> None:
        self.wants_help = False
        self.wants_version = False
        self.model: str | None = None

        positional: list[str] = []
        words = iter(argv)
        for word in words:
            if word == "--":
                positional.extend(words)
            elif word in ("-h", "--help"):
                self.wants_help = True
            elif word in ("-V", "--version"):
                self.wants_version = True
            elif word in VALUE_FLAGS:
                value = next(words, None)
                if value is None:
                    raise KnobError(f"{word} needs a value")
                if word == "--model":
                    self.model = value
            elif word.startswith("--model="):
                self.model = word.partition("=")[2]
            elif word.startswith("-") and word != "-":
                # Custom command lines carry flags q may know and we do not: ignore them.
                continue
            else:
                positional.append(word)

        if positional and positional[0] == "chat":
            positional.pop(0)

        # sys.argv holds words decoded with surrogateescape: fsencode gives back the bytes.
        self.prompt_word = os.fsencode(positional[-1]) if positional else None


# -- knobs --------------------------------------------------------------------------------


def read_env_knobs(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Return {key: (value, source)} for every non-empty QCHAT_SIM_* variable."""
    knobs = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and value != "":
            knobs[name[len(ENV_PREFIX) :].lower()] = (value, name)
    return knobs


def read_directives(text: str) -> list[tuple[str, str, int, int]]:
    """Return (key, value, start, end) for every `@sim:key=value` token in `text`.

    A directive starts the text or follows whitespace (so `bob@sim:x` is not one). A
    value ends at whitespace, or is a double-quoted string with \\" \\\\ \\n \\t escapes.
    """
    found = []
    start = text.find(DIRECTIVE)
    while start >= 0:
        if start > 0 and not text[start - 1].isspace():
            start = text.find(DIRECTIVE, start + 1)
            continue

        key_start = start + len(DIRECTIVE)
        key_end = key_start
        while key_end < len(text) and (text[key_end].isalnum() or text[key_end] in "_-"):
            key_end += 1
        if key_end == key_start or text[key_end : key_end + 1] != "=":
            token = text[start:].split(None, 1)[0]
            raise KnobError(f"malformed directive {token!r}: expected @sim:KEY=VALUE")

        key = text[key_start:key_end].lower().replace("-", "_")
        value, end = read_directive_value(text, key_end + 1)
        found.append((key, value, start, end))
        start = text.find(DIRECTIVE, end)
    return found


def read_directive_value(text: str, start: int) -> tuple[str, int]:
    """Read a directive's value from `start`; return it and the index after it."""
    if text[start : start + 1] != '"':
        end = start
        while end < len(text) and not text[end].isspace():
            end += 1
        return text[start:end], end

    escapes = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
    chars: list[str] = []
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == '"':
            return "".join(chars), index + 1
        if char == "\\" and text[index + 1 : index + 2] in escapes:
            chars.append(escapes[text[index + 1]])
            index += 2
            continue
        chars.append(char)
        index += 1
    raise KnobError(f"unterminated quoted value in directive at {text[start - 20 : start]!r}")


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def parse_finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def parse_seconds(text: str) -> float:
    value = parse_finite(text)
    if value < 0:
        raise ValueError("expected seconds >= 0")
    return value


def parse_optional_seconds(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    return parse_seconds(text)


def parse_latency(text: str) -> tuple[str, float, float]:
    """SECONDS, fixed:S, uniform:A:B, lognormal:MEDIAN:SIGMA, or a profile's name."""
    expected = "expected SECONDS, uniform:A:B, lognormal:MEDIAN:SIGMA or a profile name"
    word = text.strip().lower()
    if word in PROFILES:
        return PROFILES[word][0]

    kind, _, rest = word.partition(":")
    if not rest:
        kind, params = "fixed", [kind]
    else:
        params = rest.split(":")
    if (kind, len(params)) not in (("fixed", 1), ("uniform", 2), ("lognormal", 2)):
        raise ValueError(expected)
    try:
        numbers = [parse_finite(param) for param in params]
    except ValueError:
        raise ValueError(expected) from None

    if kind == "fixed":
        if numbers[0] < 0:
            raise ValueError("expected seconds >= 0")
        return ("fixed", numbers[0], 0.0)
    first, second = numbers
    if kind == "uniform" and not 0 <= first <= second:
        raise ValueError("uniform:A:B needs 0 <= A <= B")
    if kind == "lognormal" and (first <= 0 or second < 0):
        raise ValueError("lognormal:MEDIAN:SIGMA needs MEDIAN > 0 and SIGMA >= 0")
    return (kind, first, second)


def parse_size(text: str) -> int:
    """Bytes: an integer with an optional binary suffix (k, m, g; kb, mib and so on)."""
    word = text.strip().lower()
    digits = len(word) - len(word.lstrip("0123456789_"))
    number, unit = word[:digits], word[digits:].strip()
    scales = {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}
    scale = scales.get(unit.removesuffix("ib").removesuffix("b"))
    if not number or scale is None:
        raise ValueError("expected a byte count such as 5242880, 512k or 50M")
    return int(number) * scale


def parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 0:
        raise ValueError("expected a whole number >= 0")
    return value


def parse_exit_code(text: str) -> int:
    value = parse_count(text)
    if value > 255:
        raise ValueError("expected an exit code 0..255")
    return value


def parse_seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer") from None


def parse_rate(text: str) -> float:
    value = parse_finite(text)
    if not 0 <= value <= 1:
        raise ValueError("expected a probability in [0, 1]")
    return value


def parse_signal(text: str) -> int | None:
    """A signal that ends a process by default: KILL, SIGTERM, 9 and so on; none for none."""
    import signal

    word = text.strip().upper()
    if word in ("NONE", "OFF"):
        return None
    if word.isdigit():
        number = int(word)
    else:
        name = word if word.startswith("SIG") else "SIG" + word
        member = signal.Signals.__members__.get(name)
        if member is None:
            raise ValueError("expected a signal name or number, such as KILL, SIGTERM or 9")
        number = int(member)

    fatal = signal.valid_signals() - {getattr(signal, name, 0) for name in NOT_FATAL}
    if number not in fatal:
        raise ValueError(f"signal {text} does not end a process by default")
    return number


def parse_hang(text: str) -> str | None:
    word = text.strip().lower()
    if word in ("before", "after"):
        return word
    try:
        return "before" if parse_bool(word) else None
    except ValueError:
        raise ValueError("expected before, after, or a boolean (true means before)") from None


def parse_grandchild(text: str) -> float | None:
    word = text.strip().lower()
    if word in ("forever", "inf"):
        return math.inf
    if word in ("off", "none", "no", "false"):
        return None
    seconds = parse_seconds(word)
    return seconds or None


def parse_failure(text: str) -> str | None:
    word = text.strip().lower()
    if word in ("none", "off"):
        return None
    if word in FAILURE_KINDS:
        return FAILURE_KINDS[word]
    if word in FAILURES:
        return word
    names = ", ".join([*FAILURE_KINDS, *FAILURES])
    raise ValueError(f"expected one of {names}")


def choice_of(*words: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in words:
            raise ValueError("expected one of " + ", ".join(words))
        return word

    return parse


def parse_text(text: str) -> str:
    return text


parse_stdin_mode = choice_of("append", "ignore")


class KnobReader:
    """Looks knobs up; a bad value becomes a KnobError that names its source."""

    def __init__(self, raw: dict[str, tuple[str, str]]) -> None:
        self.raw = raw

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        entry = self.raw.get(name)
        if entry is None:
            return default
        value, source = entry
        try:
            return parse(value)
        except ValueError as err:
            raise KnobError(f"bad knob {name}={value!r} (from {source}): {err}") from None

    def check_names(self) -> None:
        for name, (_, source) in self.raw.items():
            if name not in KNOBS:
                import difflib

                near = difflib.get_close_matches(name, KNOBS, n=1)
                hint = f"; did you mean {near[0]}?" if near else ""
                raise KnobError(f"unknown knob {name!r} (from {source}){hint}")


class Settings:
    """The validated knobs of one call."""

    def __init__(self, raw: dict[str, tuple[str, str]]) -> None:
        knob = KnobReader(raw)
        knob.check_names()

        self.profile = knob.get("profile", choice_of(*PROFILES), "default")
        latency, latency_max, style = PROFILES[self.profile]
        self.latency = knob.get("latency", parse_latency, latency)
        self.latency_max = knob.get("latency_max", parse_optional_seconds, latency_max)
        self.style = style
        self.chatter = knob.get("chatter", parse_bool, style != "minimal")
        self.seed = knob.get("seed", parse_seed, None)

        self.stdout_bytes = knob.get("stdout_bytes", parse_size, 0)
        self.stderr_bytes = knob.get("stderr_bytes", parse_size, 0)
        self.exit_code = knob.get("exit", parse_exit_code, 0)
        self.signal = knob.get("signal", parse_signal, None)
        self.hang = knob.get("hang", parse_hang, None)
        self.ignore_sigterm = knob.get("ignore_sigterm", parse_bool, False)
        self.grandchild = knob.get("grandchild", parse_grandchild, None)
        self.failure = knob.get("failure", parse_failure, None)
        self.memory_mb = knob.get("memory_mb", parse_count, 0)
        self.child_memory_mb = knob.get("child_memory_mb", parse_count, 0)
        self.echo = knob.get("echo", choice_of("off", "sha256", "prompt"), "off")

        self.crash_rate = knob.get("crash_rate", parse_rate, 0.0)
        self.hang_rate = knob.get("hang_rate", parse_rate, 0.0)
        self.throttle_rate = knob.get("throttle_rate", parse_rate, 0.0)
        if self.crash_rate + self.hang_rate + self.throttle_rate > 1 + 1e-9:
            raise KnobError("crash_rate + hang_rate + throttle_rate must not exceed 1")

        self.loop = knob.get("loop", choice_of("auto", "on", "off"), "auto")
        self.prompt_file = knob.get("prompt_file", parse_text, "PROMPT.md")
        self.promise = knob.get("promise", parse_text, "LOOP_COMPLETE")
        self.stall = knob.get("stall", parse_bool, False)
        self.repeat = knob.get("repeat", parse_text, None)
        self.work_dir = knob.get("work_dir", parse_text, None)

        self.ansi_stdout = knob.get("ansi_stdout", parse_bool, False)

        # run() uses these two before the settings exist; they are checked here all the
        # same, so that a bad value in a directive that came on stdin is not let through.
        knob.get("count_file", parse_text, None)
        knob.get("stdin", parse_stdin_mode, "append")

    def wants_chance(self) -> bool:
        return bool(self.crash_rate or self.hang_rate or self.throttle_rate)


# -- one call -----------------------------------------------------------------------------


class Call:
    """One simulated `q chat` call: its prompt, its settings, and what it holds."""

    def __init__(self, prompt: bytes, settings: Settings, model: str | None) -> None:
        self.prompt = prompt
        self.text = prompt.decode("utf-8", "surrogateescape")
        self.settings = settings
        self.model = model
        self.colours = NO_COLOURS if os.environ.get("NO_COLOR") else COLOURS
        self.held: list[object] = []
        self._digest: str | None = None
        self._rng: random.Random | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = sha256_hex(self.prompt)
        return self._digest

    @property
    def rng(self) -> random.Random:
        if self._rng is None:
            import random

            seed = self.settings.seed
            if seed is None:
                self._rng = random.Random()
            else:
                # With the prompt in the seed, a chaos run over many prompts varies from
                # prompt to prompt and still replays exactly.
                self._rng = random.Random(f"{seed}:{self.digest}")
        return self._rng

    def paint(self, template: str, **fields: str) -> bytes:
        return template.format(**self.colours, **fields).encode()


def sha256_hex(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_prompt(word: bytes | None, stdin_mode: str) -> bytes:
    """The prompt as q builds it: the argv word, then a non-terminal stdin appended."""
    if word is None:
        return read_stdin()
    if stdin_mode == "append" and not os.isatty(0):
        # q reads a stdin that is not a terminal to its end even with a prompt word: a
        # caller that leaves it an open pipe hangs the call, as with q.
        return word + read_stdin()
    return word


def read_stdin() -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(0, CHUNK)
        except OSError:
            # No stdin at all (fd 0 closed) reads as an empty prompt.
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def count_invocation(raw: dict[str, tuple[str, str]], prompt: bytes) -> None:
    """Append one line per call to the count file: pid, time, sha256 of the prompt."""
    entry = raw.get("count_file")
    if entry is None:
        return

    path, source = entry
    line = f"{os.getpid()}\t{time.time():.6f}\tsha256:{sha256_hex(prompt)}\n"

    # One write() to an O_APPEND file lands whole at its end: concurrent calls from many
    # processes never overwrite or split each other's lines.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise KnobError(f"bad knob count_file={path!r} (from {source}): {err.strerror}") from None


def draw_fault(call: Call) -> str | None:
    """Draw this call's injected fault: crash, hang, throttle, or None."""
    settings = call.settings
    if not settings.wants_chance():
        return None

    draw = call.rng.random()
    for fault, rate in (
        ("crash", settings.crash_rate),
        ("hang", settings.hang_rate),
        ("throttle", settings.throttle_rate),
    ):
        if draw < rate:
            return fault
        draw -= rate
    return None


def sample_latency(call: Call) -> float:
    kind, first, second = call.settings.latency
    if kind == "fixed":
        seconds = first
    elif kind == "uniform":
        seconds = call.rng.uniform(first, second)
    else:
        seconds = call.rng.lognormvariate(math.log(first), second)

    cap = call.settings.latency_max
    return seconds if cap is None else min(seconds, cap)


def run(argv: list[str]) -> int:
    command = CommandLine(argv)
    if command.wants_help:
        write_all(1, USAGE.format(keys=", ".join(KNOBS)).encode())
        return 0
    if command.wants_version:
        from ralph_supervisor import __version__

        write_all(1, f"qchat-sim {__version__} (a stand-in for q chat)\n".encode())
        return 0

    # Knobs in the prompt word may say how to treat stdin, which completes the prompt.
    env_knobs = read_env_knobs(os.environ)
    early = dict(env_knobs)
    if command.prompt_word is not None:
        word_text = command.prompt_word.decode("utf-8", "surrogateescape")
        early.update(directive_knobs(word_text))
    stdin_mode = KnobReader(early).get("stdin", parse_stdin_mode, "append")
    prompt = read_prompt(command.prompt_word, stdin_mode)

    raw = dict(env_knobs)
    raw.update(directive_knobs(prompt.decode("utf-8", "surrogateescape")))

    # Count before validating: a process was started, whatever its knobs say.
    count_invocation(raw, prompt)

    call = Call(prompt, Settings(raw), command.model)
    return perform(call)


def directive_knobs(text: str) -> dict[str, tuple[str, str]]:
    return {key: (value, DIRECTIVE + key) for key, value, _, _ in read_directives(text)}


def perform(call: Call) -> int:
    """Act out the call, step by step, as its knobs say."""
    settings = call.settings
    fault = draw_fault(call)

    # Before any child exists, so that they inherit it and only SIGKILL ends the tree.
    if settings.ignore_sigterm or fault == "hang":
        ignore_sigterm()

    # The first chatter also tells a test that the knobs above are in force.
    if settings.chatter:
        write_all(2, spinner(call))

    # The grandchild first, so that it shares no page with the memory allocated below.
    if settings.grandchild is not None:
        start_grandchild(settings.grandchild)
    if settings.child_memory_mb:
        call.held.append(start_memory_child(settings.child_memory_mb))
    if settings.memory_mb:
        call.held.append(allocate(settings.memory_mb))

    if settings.hang == "before" or fault == "hang":
        hang_forever()

    time.sleep(sample_latency(call))
    if settings.chatter:
        write_all(2, spinner_done(call))

    if fault == "crash":
        return crash(call)

    failure = settings.failure
    if fault == "throttle":
        failure = call.rng.choice(THROTTLED)
    if failure is not None:
        write_all(2, failure_message(call, failure))
    else:
        answer = compose_answer(call)
        write_all(1, paint_stdout(answer) if settings.ansi_stdout else answer)

    write_filler(settings.stdout_bytes, settings.stderr_bytes)

    if settings.hang == "after":
        hang_forever()
    if settings.chatter:
        write_all(2, call.paint("{o}"))
    if settings.signal is not None:
        die_by(settings.signal)
    return settings.exit_code


# -- what the call says -------------------------------------------------------------------


def spinner(call: Call) -> bytes:
    if call.colours is NO_COLOURS:
        return b"Thinking...\n"
    # q hides the cursor and draws a spinner frame, whatever stderr is.
    return "\x1b[?25l\x1b[38;5;13m\u280b\x1b[0m Thinking...".encode()


def spinner_done(call: Call) -> bytes:
    if call.colours is NO_COLOURS:
        return b""
    return b"\r\x1b[2K\x1b[?25h"


def failure_message(call: Call, name: str) -> bytes:
    _, template = FAILURES[name]
    now = time.localtime()
    reset_on = f"{now.tm_mon % 12 + 1:02d}/01"
    return call.paint(template, reset_on=reset_on)


def crash(call: Call) -> int:
    """Crash as q can: an error exit, a Rust panic (exit 101), or the OOM killer's SIGKILL."""
    how = call.rng.choice(("error", "panic", "kill"))
    if how == "kill":
        import signal

        die_by(signal.SIGKILL)
    if how == "panic":
        write_all(
            2,
            b"thread 'main' panicked at crates/chat-cli/src/cli/chat/mod.rs:1422:38:\n"
            b"called `Result::unwrap()` on an `Err` value: Os { code: 32, kind: BrokenPipe }\n"
            b"note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n",
        )
        return 101
    write_all(2, call.paint("{r}error{o}: stream ended unexpectedly: connection reset by peer\n"))
    return 1


def compose_answer(call: Call) -> bytes:
    """The stdout of a successful call. The checklist work is done whatever is answered."""
    settings = call.settings
    report = work_on_checklist(call) if settings.loop != "off" else None

    if settings.echo == "sha256":
        return f"sha256:{call.digest} bytes:{len(call.prompt)}\n".encode()
    if settings.echo == "prompt":
        return call.prompt
    if settings.repeat is not None:
        return (settings.repeat + "\n").encode()
    if report is not None:
        return report.encode()
    return default_answer(call).encode()


def default_answer(call: Call) -> str:
    """A plausible answer that depends on the prompt (and --model) alone, like a cached one."""
    style = call.settings.style
    if style == "minimal":
        # The benchmarks' mode: no hashing, nothing to read.
        return "ok\n"

    subject = describe_prompt(call.text)
    steps = {"short": 2, "normal": 3, "long": 6}[style]
    first = int(call.digest[:8], 16) % (len(STEPS) - steps + 1)
    chosen = STEPS[first : first + steps]

    lines = [f'You asked: "{subject}"', "", "Here is how I would go about it:"]
    lines += [f"{number}. {step}" for number, step in enumerate(chosen, 1)]
    if style == "long":
        lines += ["", "```python", "def check(result):", "    assert result.ok, result", "```"]
        lines += ["", "Each step is small enough to review on its own."]
    model = f", model {call.model}" if call.model else ""
    lines += ["", f"(answer {call.digest[:12]}, prompt {len(call.prompt)} bytes{model})"]
    return "\n".join(lines) + "\n"


def describe_prompt(text: str) -> str:
    """The prompt's first words, without directives, on one line of at most 60 chars."""
    kept = []
    position = 0
    for _, _, start, end in read_directives(text):
        kept.append(text[position:start])
        position = end
    kept.append(text[position:])
    words = " ".join("".join(kept).split())
    if not words:
        return "(an empty prompt)"
    return words if len(words) <= 60 else words[:57] + "..."


def paint_stdout(answer: bytes) -> bytes:
    """Colour every line. Stripping the escape sequences gives back `answer` exactly."""
    painted = []
    for line in answer.splitlines(keepends=True):
        body = line.rstrip(b"\r\n")
        end = line[len(body) :]
        painted.append(b"\x1b[38;5;10m" + body + b"\x1b[0m" + end if body else line)
    return b"".join(painted)


# -- the Ralph loop agent -----------------------------------------------------------------


def work_on_checklist(call: Call) -> str | None:
    """Tick the first `- [ ]` item of the prompt file; return what was done.

    None when the loop is off for this call: loop=auto and no file or no checklist.
    """
    settings = call.settings
    path = settings.prompt_file
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        if settings.loop == "on":
            raise SimError(f"loop=on, but {path} is not in {os.getcwd()}") from None
        return None

    lines = data.decode("utf-8", "surrogateescape").splitlines(keepends=True)
    boxes: list[tuple[int, int, bool, str]] = []  # (number, line index, done, label)
    for index, line in enumerate(lines):
        box = read_box(line)
        if box is not None:
            boxes.append((len(boxes) + 1, index, *box))
    if not boxes and settings.loop == "auto":
        return None

    total = len(boxes)
    todo = [box for box in boxes if not box[2]]
    if not todo:
        return f"All {total} items in {path} are done.\n{settings.promise}\n"

    number, index, _, label = todo[0]
    if settings.stall:
        return (
            f"Looked at item {number} of {total}: {label}\n"
            "I have not changed any file yet; I will pick it up next time.\n"
        )

    if settings.chatter:
        bold, reset = call.colours["b"], call.colours["o"]
        note = f"{bold}Using tool: fs_write{reset} (trusted)\n \u25cf Path: {path}\n"
        write_all(2, note.encode("utf-8", "surrogateescape"))
    lines[index] = lines[index].replace("[ ]", "[x]", 1)
    write_atomically(path, "".join(lines).encode("utf-8", "surrogateescape"))
    if settings.work_dir is not None:
        record_work(settings.work_dir, number, label)

    left = len(todo) - 1
    report = [f"Working on item {number} of {total}: {label}"]
    report.append(f"Done: ticked item {number} in {path}; {left} left.")
    if not left:
        report += [f"All {total} items are done.", settings.promise]
    return "\n".join(report) + "\n"


def read_box(line: str) -> tuple[bool, str] | None:
    """(done, label) for a `- [ ] label` or `- [x] label` line; None for any other."""
    stripped = line.lstrip()
    if stripped[:2] not in ("- ", "* ", "+ "):
        return None
    mark, rest = stripped[2:5], stripped[5:]
    if mark not in ("[ ]", "[x]", "[X]") or (rest and not rest[0].isspace()):
        return None
    return mark != "[ ]", rest.strip()


def write_atomically(path: str, data: bytes) -> None:
    """Replace `path` by rename, so that a reader sees the old file or the new, never half."""
    directory, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(directory, f".{name}.{os.getpid()}.qchat-sim.tmp")
    mode = os.stat(path).st_mode & 0o7777

    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)

    # No fsync: atomicity against readers is what the loop needs, not durability.
    os.replace(temp, path)


def record_work(work_dir: str, number: int, label: str) -> None:
    """Change the work tree as an agent would: append to work_dir/item-N.txt."""
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, f"item-{number}.txt")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        write_all(fd, f"{label} (done by qchat-sim, pid {os.getpid()})\n".encode())
    finally:
        os.close(fd)


# -- output -------------------------------------------------------------------------------


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_filler(stdout_bytes: int, stderr_bytes: int) -> None:
    """Write exactly N filler bytes to stdout and to stderr, a chunk of each in turn.

    Interleaved as q streams while it logs: a caller that drains one pipe to its end
    before it reads the other deadlocks here, as it would with q.
    """
    if not stdout_bytes and not stderr_bytes:
        return
    filler = (FILLER_LINE * (CHUNK // len(FILLER_LINE) + 1))[:CHUNK]
    left = {1: stdout_bytes, 2: stderr_bytes}
    while any(left.values()):
        for fd, count in left.items():
            size = min(count, CHUNK)
            if size:
                write_all(fd, filler[:size])
                left[fd] = count - size


# -- processes, memory and signals --------------------------------------------------------


def allocate(mb: int) -> bytearray:
    # bytearray(n) maps zero pages lazily; a filled one has every page resident.
    return bytearray(b"\xa5") * (mb * MIB)


def start_memory_child(mb: int) -> int:
    """Fork a child that holds `mb` MiB while this process lives; return the fd keeping it.

    Returns once the child's memory is resident, so a caller that sees the answer sees
    the memory. The child's stdio is /dev/null: holding the caller's pipes is the
    grandchild's knob, not this one's.
    """
    ready_read, ready_write = os.pipe()
    hold_read, hold_write = os.pipe()

    if os.fork() == 0:
        try:
            os.close(ready_read)
            os.close(hold_write)
            redirect_stdio_to_devnull()
            block = allocate(mb)
            os.write(ready_write, b"!")
            # EOF once the simulator is gone, whichever way it ended.
            os.read(hold_read, 1)
            del block
        finally:
            os._exit(0)

    os.close(ready_write)
    os.close(hold_read)
    os.read(ready_read, 1)
    os.close(ready_read)
    return hold_write


def redirect_stdio_to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def start_grandchild(seconds: float) -> None:
    """Fork a process that keeps stdout and stderr open for `seconds` (inf: forever).

    It stays in the simulator's process group: only a kill of the whole group ends it
    early, and a caller reading the pipes sees EOF only when it ends.
    """
    if os.fork() == 0:
        try:
            if math.isinf(seconds):
                hang_forever()
            time.sleep(seconds)
        finally:
            os._exit(0)


def hang_forever() -> None:
    while True:
        time.sleep(3600)


def ignore_sigterm() -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def die_by(number: int) -> None:
    """Die by signal `number`, as q would if the kernel or someone sent it."""
    import resource
    import signal

    # A core file per simulated crash would fill the work tree.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    # Python ignores SIGPIPE and catches SIGINT; the signal must do what it does to q.
    if number not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)

    # Unreachable: a fatal signal sent to oneself is delivered before kill() returns.
    raise SimError(f"signal {number} did not end the process")


def main(argv: list[str] | None = None) -> int:
    """Run one simulated `q chat` call and return its exit code (the console script)."""
    try:
        return run(sys.argv[1:] if argv is None else list(argv))
    except SimError as err:
        try:
            write_all(2, f"qchat-sim: {err}\n".encode())
        except OSError:
            pass
        return err.code
    except BrokenPipeError:
        # The caller closed a pipe early; q ends then too, and nobody is left to tell.
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
