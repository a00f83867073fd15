"""Layer 1 (core): where progress messages go.

Every module logs its progress with `logging.getLogger(__name__)` (no `log=print` parameters
threaded through the calls). The CLI calls `show_progress()` once: INFO messages of the
"lungbench" loggers then go to stderr, one plain line each, and stdout keeps the result
tables. Under a launcher only rank 0 speaks (`quiet_unless_main`). A library user who
configures nothing sees warnings only (Python's default).
"""

from __future__ import annotations

import logging
import sys

LOGGER = "lungbench"


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is at the time (pytest's capture, a redirected stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # a closed stream must not end the run
            self.handleError(record)


def show_progress(level: int = logging.INFO) -> None:
    """Send the lungbench loggers' messages at `level` and above to stderr (idempotent)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def quiet_unless_main(is_main: bool) -> None:
    """Under a launcher, rank 0 alone reports progress; the other ranks keep warnings."""
    if not is_main:
        logging.getLogger(LOGGER).setLevel(logging.WARNING)
