"""User errors: problems with what a user gave (a manifest, a scan, an option, a run folder, a checkpoint), as
opposed to bugs. Every ``stvnet`` subcommand reports them as ``stvnet <cmd>: error: <where>: <problem>; <what to
do>``, one line per problem, and exits with status 2, without a traceback; ``--debug`` (or ``STVNET_DEBUG=1``) shows
the traceback too. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

DEBUG_ENV = "STVNET_DEBUG"


class UserError(Exception):
    """One or more problems a user can fix, one line each (``where: problem; what to do``)."""

    def __init__(self, *lines: str):
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


class InvalidInput(UserError, ValueError):
    """A user error that is also a ``ValueError``, for library callers that catch that (an option out of range, a
    cohort too small for its folds)."""


class MissingInput(UserError, FileNotFoundError):
    """A user error that is also a ``FileNotFoundError`` (a run folder, checkpoint or file that is not there)."""


def debugging(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether tracebacks are wanted (``--debug`` anywhere in ``argv``, or ``STVNET_DEBUG=1``), and ``argv`` without
    the flag."""
    wanted = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return wanted, [a for a in argv if a != "--debug"]


def report(command: str, error: UserError, debug: bool = False) -> int:
    """Print a user error's lines on stderr (with the traceback when debugging) and return exit status 2."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    for line in error.lines:
        print(f"stvnet {command}: error: {line}", file=sys.stderr)
    return 2


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` of a library's exception as one short line: torch's and SimpleITK's messages span several
    lines and torch's carry terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:limit]}"
