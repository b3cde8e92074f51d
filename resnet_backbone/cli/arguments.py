"""Argument types that reject a user error while the command line is parsed, before any work starts, with
one line that says what was expected and what was received."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that an error is one line (``prog: error: ...``) and exit code 2, with no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class ArgumentError(argparse.ArgumentTypeError, ValueError):
    """A bad argument: argparse reports it while parsing, and ``main`` when a verb checks it later."""


def positive_int(text: str) -> int:
    return _number(text, int, "an integer >= 1", lambda value: value >= 1)


def non_negative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda value: value >= 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lambda value: 0 <= value < math.inf)


def _number(text: str, kind: type, expected: str, valid) -> int | float:  # noqa: ANN001
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ArgumentError(f"expected {expected}, got {text!r}")
    return value


def output_directory(text: str) -> Path:
    """A folder to write into: it may not exist yet, but it must be creatable and writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{text} exists and is not a folder")
    _require_writable_ancestor(path, text)
    return path


def output_file(text: str) -> Path:
    """A file to write: its folder must exist and be writable, and it must not be a folder itself. Whether an
    existing file may be replaced is ``refuse_existing``'s question."""
    path = Path(text)
    if path.is_dir():
        raise ArgumentError(f"{text} is a folder; expected a file path")
    if not path.parent.is_dir():
        raise ArgumentError(f"the folder {path.parent} does not exist (for the output file {text})")
    _require_writable_ancestor(path.parent, text)
    return path


def refuse_existing(outputs: Iterable[Path], overwrite: bool) -> None:
    """Keep an earlier result unless the user asked to replace it (``--overwrite``)."""
    existing = next((path for path in outputs if path.exists()), None)
    if existing is not None and not overwrite:
        raise ArgumentError(f"{existing} already exists; pass --overwrite to replace it")


def existing_directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise ArgumentError(f"expected an existing folder, got {text!r} ({_what_is(path)})")
    return path


def _require_writable_ancestor(path: Path, text: str) -> None:
    ancestor = next(parent for parent in [path, *path.parents] if parent.exists())
    if not ancestor.is_dir():
        raise ArgumentError(f"cannot create {text}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only_filesystem(ancestor):
        raise ArgumentError(f"cannot write to {text}: {ancestor} is not writable")


def _read_only_filesystem(folder: Path) -> bool:
    """``os.access`` says yes to root even on a read-only mount; ``statvfs`` knows better."""
    return sys.platform != "win32" and bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def _what_is(path: Path) -> str:
    return "a file" if path.is_file() else "it does not exist"
