"""Layer 1 (core): Error types that the CLI turns into one-line messages.

`UsageError` means the user asked for something invalid (exit code 2); `DataError`
means an input file is missing or malformed (exit code 2 too: it is the user's input).
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LungbenchError(Exception):
    """Base class for errors reported to the user as one line."""

    exit_code = 1


class UsageError(LungbenchError):
    """An invalid option, name or value given by the user."""

    exit_code = 2


class DataError(LungbenchError):
    """A missing, unreadable or malformed input file (the message names the file)."""

    exit_code = 2


def is_oom(exc: BaseException) -> bool:
    """True for the allocators' out-of-memory errors: CUDA's (torch.cuda.OutOfMemoryError,
    a RuntimeError saying "out of memory") and the CPU allocator's ("can't allocate
    memory"), and Python's MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def message_of(exc: BaseException) -> str:
    """The one line to show for `exc`.

    An error raised in a DataLoader worker comes back re-raised with the worker's whole
    traceback in its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ..."): its own message is the last line, after the type name.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and "Original Traceback" in str(exc):
        last = lines[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        for head in (prefix, f"{type(exc).__name__}: "):
            if last.startswith(head):
                return last[len(head) :]
        return last
    return lines[0]


def look_up_option(name: str, choices: Iterable[str], what: str = "option") -> str:
    """Return `name` if it is one of `choices`, else raise UsageError with a suggestion.

    Modelled on MONAI's `look_up_option`: the error lists the valid choices and,
    when one is close, asks "did you mean ...?".
    """
    choices = list(choices)
    if name in choices:
        return name
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"unknown {what} {name!r}{hint}; choose from: {', '.join(choices)}")


def positive_int(value: int, what: str) -> int:
    """Validate an integer option that must be >= 1."""
    if int(value) < 1:
        raise UsageError(f"{what} must be >= 1, got {value}")
    return int(value)
