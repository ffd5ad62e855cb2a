"""The ``flo-coord`` command (also ``python -m flo_coord``).

User mistakes (bad flags, bad configuration, unreachable Redis, unknown request) print
one line and exit with code 2; a failed request or a failed demo exits with 1; Ctrl-C
exits with 130. Only bugs print tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from flo_coord.cli.common import CommandFailedError, UsageError
from flo_coord.cli.parser import build_parser, subcommand_parser

__all__ = ["build_parser", "main"]


def _fail(command: str, message: str, code: int) -> int:
    from flo_coord.redact import redact_secrets

    line = f"flo-coord {command}: error: {redact_secrets(message)}"
    print(line.replace("flo-coord : ", "flo-coord: "), file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    from flo_coord.errors import ConfigError, CoordinatorUnavailableError, UnknownRequestError, ValidationError
    from flo_coord.metrics import MetricsUnavailableError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        # everything after "bench" belongs to scripts/bench.py, options included
        args = argparse.Namespace(command="bench", handler="flo_coord.cli.serve:cmd_bench", bench_args=argv[1:])
    else:
        args, extras = parser.parse_known_args(argv)
        if extras:  # reported by the subcommand's own parser, so the message points at its own --help
            subcommand_parser(parser, getattr(args, "command", None)).error(
                f"unrecognized arguments: {' '.join(extras)}"
            )
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    module, _, name = args.handler.partition(":")
    try:
        return int(getattr(importlib.import_module(module), name)(args) or 0)
    except (UsageError, ConfigError, ValidationError, UnknownRequestError, MetricsUnavailableError) as exc:
        return _fail(args.command, str(exc), 2)
    except CommandFailedError as exc:
        return _fail(args.command, str(exc), 1)
    except CoordinatorUnavailableError as exc:
        return _fail(args.command, f"{exc} (is Redis still up?)", 1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `flo-coord history | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
