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
from pathlib import Path

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


def refuse_blocked_folder(path: str | os.PathLike, option: str) -> Path:
    """Raise one line when the output folder a user named cannot be made because a file stands where it or one of
    its parents must be (checked before any work, so no result is lost at the end); returns the path."""
    folder = Path(path)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{option} {folder}: {blocking} is a file, not a folder; choose another {option} "
                        "or move that file")
    return folder


def output_folder(path: str | os.PathLike, option: str) -> Path:
    """Create the folder a user named for outputs (and its parents), or raise one line naming the option, the path
    and why it cannot be a folder: a file where a folder must be, no permission, a read-only or full disk."""
    folder = refuse_blocked_folder(path, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option} {folder}: cannot create the folder ({exception_line(exc)}); choose a folder "
                        "you can write to") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option} {folder}: the folder is not writable; choose a folder you can write to")
    return folder
