"""Layer 1 (core): Result paths stay inside the output folder the user chose.

A run id or any other name that becomes a path component under `--out` must be one plain
name: no path separators, no '..', no absolute paths, no control characters. Checked before
anything is written, as a one-line UsageError naming the option.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lungbench.core.errors import UsageError

# Letters, digits and . _ - + = @ , : (what schedulers and timestamps put in names).
_NAME = re.compile(r"^[A-Za-z0-9._\-+=@,:]+$")


MAX_NAME = 200


def check_name(name: str, what: str = "--run-id") -> str:
    """`name` if it is a single safe path component, else UsageError naming `what`."""
    text = str(name)
    if (
        not text
        or text in (".", "..")
        or "/" in text
        or "\\" in text
        or os.sep in text
        or (os.altsep and os.altsep in text)
    ):
        raise UsageError(f"{what} {text!r}: must be one folder name (no path separators, no '..')")
    if ".." in text or not _NAME.match(text) or len(text) > MAX_NAME:
        raise UsageError(
            f"{what} {text!r}: use letters, digits and . _ - + = @ , : only "
            f"(at most {MAX_NAME} characters, no '..')"
        )
    return text


def confined(root: str | os.PathLike, *parts: str, what: str = "path") -> Path:
    """root/parts... resolved, and UsageError unless it lies inside root."""
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise UsageError(f"{what} {Path(*parts)}: escapes the output folder {root}")
    return target


def check_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """`path` if it is, or can become, a writable folder: UsageError naming `what` when it
    or a folder above it is a file, or the nearest existing folder is not writable."""
    path = Path(path)
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            where = "" if existing == path else f" ({existing} is a file)"
            raise UsageError(f"{what} {path}: exists and is not a directory{where}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"{what} {path}: {existing} is not writable")
        break
    return path
