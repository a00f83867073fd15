"""Layer 1 (core): where progress messages go.

Every module logs its progress with `logging.getLogger(__name__)` (no `log=print` parameters
threaded through the calls). The CLI calls `show_progress()` once: INFO messages of the
"lungbench" loggers then go to stderr, one plain line each, and stdout keeps the result
tables. Under a launcher only rank 0 speaks (`quiet_unless_main`). A library user who
configures nothing sees warnings only (Python's default).

The CLI also calls `capture_foreign_messages()`: Python warnings and the messages of the
third-party libraries' loggers (pydicom, nibabel, matplotlib, ...) go to the
"lungbench.foreign" logger at DEBUG, not to the terminal. They speak to programmers
("use force=True", "setting 0 dims to 1"); what the user must know, our checks say in
their own words.
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


FOREIGN = f"{LOGGER}.foreign"
# Loggers of the libraries we call; their children ("matplotlib.font_manager") propagate here.
FOREIGN_LOGGERS = ("py.warnings", "pydicom", "nibabel", "matplotlib", "PIL", "h5py", "fontTools")


def _to_our_log(record: logging.LogRecord) -> bool:
    """Re-log a third-party record at DEBUG under FOREIGN; False: nothing else handles it."""
    try:
        text = record.getMessage()
    except Exception:  # a malformed third-party format string must not raise here
        text = str(record.msg)
    logging.getLogger(FOREIGN).debug("%s: %s", record.name, " ".join(text.split()))
    return False


class _ToOurLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _to_our_log(record)


def capture_foreign_messages() -> None:
    """Third-party warnings and log messages into our log at DEBUG (idempotent)."""
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger
    for name in FOREIGN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _ToOurLog) for h in logger.handlers):
            logger.addHandler(_ToOurLog())
        logger.propagate = False  # else Python's last-resort handler prints them
    # nibabel gives "nibabel.global" its own stderr handler when it is imported (later):
    # a filter on that logger runs before any of its handlers.
    nibabel = logging.getLogger("nibabel.global")
    if _to_our_log not in nibabel.filters:
        nibabel.addFilter(_to_our_log)


def quiet_unless_main(is_main: bool) -> None:
    """Under a launcher, rank 0 alone reports progress; the other ranks keep warnings."""
    if not is_main:
        logging.getLogger(LOGGER).setLevel(logging.WARNING)
