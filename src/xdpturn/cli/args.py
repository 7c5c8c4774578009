"""What every command of the command line shares: the usage error and parsing one argument.

Usage errors exit with status 2 and a one-line message that names the option, e.g.
`xdpturn serve: --ports: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535, got '9-1'`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
USAGE_ERROR = 2


class UsageError(Exception):
    def __init__(self, command: str, message: str, prog: str = "xdpturn") -> None:
        super().__init__(f"{prog} {command}: {message}")


def parse_arg(
    command: str, flag: str, parse: Callable[[str], T], text: str, prog: str = "xdpturn"
) -> T:
    """`parse(text)`, or a UsageError naming `flag` with the parser's reason."""
    try:
        return parse(text)
    except ValueError as e:
        raise UsageError(command, f"{flag}: {e}", prog) from None


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse `argv` and run the chosen command (its `run` default): its exit status, or
    USAGE_ERROR with the one-line message of a UsageError."""
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return USAGE_ERROR
    return code


__all__ = ["USAGE_ERROR", "UsageError", "parse_arg", "run_command"]
