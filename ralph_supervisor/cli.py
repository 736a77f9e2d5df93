"""The `ralph-supervisor` command line.

This module owns the argument parser and the exit codes. Each command is a
function add_<name>_parser(subparsers) that adds its parser and sets its
handler; a handler takes the parsed arguments and returns the exit code.
COMMANDS lists the commands, and main() turns every failure into one line on
stderr and an exit code, so no traceback reaches a user (QCHAT_DEBUG=1 shows
it).

    0    done
    1    a runtime failure: a QChatError, or the operating system said no
    2    bad usage or bad configuration
    70   a bug in ralph-supervisor (EX_SOFTWARE)
    130  interrupted by Ctrl-C
    141  stdout was closed early, as `... | head` does (128 + SIGPIPE)

To add a command: write add_<name>_parser and its handler, and append
("<name>", add_<name>_parser) to COMMANDS. Use add_config_option and
load_config_from_args so that every command reads the configuration alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ralph_supervisor import __version__, commands
from ralph_supervisor.config import (
    Config,
    describe,
    load_config,
    parse_flag,
    render_example,
)
from ralph_supervisor.demo import add_demo_parser
from ralph_supervisor.errors import ConfigError, QChatError

PROG = "ralph-supervisor"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

Subparsers = Any  # argparse's _SubParsersAction, which has no public name


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose --help shows every default.

    add_subparsers makes subparsers of the parent's class, so every command
    below the root gets the same formatter without asking for it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """The --config FILE option that every command reading the config takes."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="the YAML configuration file; without it, defaults and the environment",
    )


def load_config_from_args(args: argparse.Namespace) -> Config:
    """The configuration for a command: its --config file and os.environ."""
    return load_config(getattr(args, "config", None))


# ---------------------------------------------------------------------------
# config


def add_config_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "config",
        help="show, check or write the configuration",
        description="Show, check or write the configuration.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    show = actions.add_parser(
        "show",
        help="print the configuration in effect and where each value came from",
        description=(
            "Print the configuration in effect: defaults, then the file, then the "
            "environment. Each value notes its source."
        ),
    )
    add_config_option(show)
    show.set_defaults(handler=run_config_show)

    validate = actions.add_parser(
        "validate",
        help="check a configuration file, listing every problem",
        description=(
            "Check a configuration file on its own (the environment is not read). "
            "Prints 'FILE: ok', or every problem on its own line and exits 2."
        ),
    )
    validate.add_argument("file", metavar="FILE", help="the YAML file to check")
    validate.set_defaults(handler=run_config_validate)

    example = actions.add_parser(
        "example",
        help="print a documented configuration file with every default",
        description="Print every setting at its default, each with a one-line comment.",
    )
    example.set_defaults(handler=run_config_example)


def run_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(describe(load_config_from_args(args)))
    return EXIT_OK


def run_config_validate(args: argparse.Namespace) -> int:
    try:
        load_config(args.file, env={})
    except ConfigError as error:
        for problem in getattr(error, "problems", [str(error)]):
            print(_one_line(problem), file=sys.stderr)
        return EXIT_USAGE

    print(f"{args.file}: ok")
    return EXIT_OK


def run_config_example(args: argparse.Namespace) -> int:
    sys.stdout.write(render_example())
    return EXIT_OK


# ---------------------------------------------------------------------------
# cache stats | clear | prune


def add_cache_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="inspect or empty the response cache",
        description=(
            "The response cache of the state directory (cache.dir, else "
            "STATE_DIR/cache). Hits and misses count every process that used it."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, handler, text in (
        ("stats", run_cache_stats, "entries, size, hits, misses and hit ratio"),
        ("clear", run_cache_clear, "remove every entry"),
        ("prune", run_cache_prune, "remove the expired entries"),
    ):
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_config_option(action)
        action.add_argument(
            "--workdir",
            default=".",
            help="the working directory whose state directory holds the cache",
        )
        action.set_defaults(handler=handler)


def _open_cache(args: argparse.Namespace) -> Any:
    from ralph_supervisor.backend import open_shared_state
    from ralph_supervisor.cache import ResponseCache

    config = load_config_from_args(args)
    state_dir = config.state_dir_for(args.workdir)
    # With state.backend redis, the shared cache is the one to show.
    open_shared_state(config, state_dir)
    cache = ResponseCache(config.cache, state_dir)
    if cache.directory is None or not cache.directory.is_dir():
        print(f"{PROG}: no cache at {cache.directory}", file=sys.stderr)
        return None
    return cache


def run_cache_stats(args: argparse.Namespace) -> int:
    cache = _open_cache(args)
    if cache is None:
        return EXIT_FAILURE
    stats = cache.stats()
    ratio = stats.get("hit_ratio")
    print(f"directory  {stats.get('directory')}")
    print(f"entries    {stats.get('entries')}")
    print(f"size       {stats.get('size_bytes')} bytes")
    print(f"hits       {stats.get('hits')}")
    print(f"misses     {stats.get('misses')}")
    print(f"hit ratio  {'-' if ratio is None else f'{ratio:.1%}'}")
    if stats.get("broken"):
        print(f"broken     {stats['broken']}")
    return EXIT_OK


def run_cache_clear(args: argparse.Namespace) -> int:
    cache = _open_cache(args)
    if cache is None:
        return EXIT_FAILURE
    print(f"removed {cache.clear()} entries")
    return EXIT_OK


def run_cache_prune(args: argparse.Namespace) -> int:
    cache = _open_cache(args)
    if cache is None:
        return EXIT_FAILURE
    print(f"removed {cache.prune()} expired entries")
    return EXIT_OK


# ---------------------------------------------------------------------------
# bench: python -m bench, from a clone of the repository


def add_bench_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmark suite (python -m bench) from a clone",
        description=(
            "Run the benchmark suite of the repository this package was installed "
            "from (pip install -e): python -m bench with the same options."
        ),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller run, under two minutes")
    size.add_argument("--smoke", action="store_true", help="a tiny run: checks that it works")
    parser.add_argument("--out", help="where to write results (bench/results)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these scenarios")
    parser.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    # The suite is not installed with the package: it lives beside it in a
    # clone, and an editable install points here.
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "__main__.py").is_file():
        print(
            f"{PROG}: the benchmark suite runs from a clone of the repository "
            "(pip install -e . there, then ralph-supervisor bench)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    command = [sys.executable, "-m", "bench"]
    command += ["--quick"] if args.quick else ["--smoke"] if args.smoke else []
    command += ["--out", args.out] if args.out else []
    command += ["--only", args.only] if args.only else []
    return subprocess.call(command, cwd=root)


# ---------------------------------------------------------------------------
# The commands, and main.

# (name, add_<name>_parser), in the order --help lists them.
COMMANDS: tuple[tuple[str, Callable[[Subparsers], None]], ...] = (
    ("config", add_config_parser),
    *commands.COMMANDS,
    ("demo", add_demo_parser),
    ("cache", add_cache_parser),
    ("bench", add_bench_parser),
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="A production runtime for Ralph loops on the Amazon Q Developer CLI.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _name, add_parser in COMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code. Never lets a traceback out."""
    try:
        return _run(argv)
    except ConfigError as error:
        _report(error, f"{PROG}: {error}")
        return EXIT_USAGE
    except QChatError as error:
        _report(error, f"{PROG}: {error}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as error:
        # A directory we may not write, a port in use: the operator's to fix.
        _report(error, f"{PROG}: error: {error}")
        return EXIT_FAILURE
    except Exception as error:
        _report(error, f"{PROG}: internal error: {type(error).__name__}: {error}")
        if not _wants_traceback():
            print(f"{PROG}: rerun with QCHAT_DEBUG=1 to see the traceback", file=sys.stderr)
        return EXIT_INTERNAL


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        # --help, --version and usage errors: argparse has printed its piece.
        return _exit_code(stop)

    code = int(args.handler(args))

    # Flush here rather than at interpreter exit, so that a reader who went
    # away (`| head`) is seen by main() and not reported by Python at exit.
    sys.stdout.flush()
    return code


def _report(error: BaseException, line: str) -> None:
    if _wants_traceback():
        traceback.print_exception(error, file=sys.stderr)
    print(_one_line(line), file=sys.stderr)


def _wants_traceback() -> bool:
    try:
        return parse_flag(os.environ.get("QCHAT_DEBUG", ""))
    except ValueError:
        return False


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))


def _exit_code(stop: SystemExit) -> int:
    if stop.code is None:
        return EXIT_OK
    if isinstance(stop.code, int):
        return stop.code
    return EXIT_FAILURE


def _silence_stdout() -> None:
    # Python flushes stdout once more at exit; with the pipe gone that flush
    # fails too and prints a second error. Point stdout at /dev/null first.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
