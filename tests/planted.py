"""Planted points for the kill-versus-finish tests: a child process that stops at a chosen
place, says so with a marker file and waits there until killed or let go, so the test's
signal lands at that exact point on a quiet or a busy machine alike (no race between the
kill and the work finishing).

The child runs `python -c PRELUDE`: the prelude wraps one function of lungbench before the
command imports it, then runs the command as `python -m lungbench` would.

The child takes Ctrl-C (SIGINT) as a terminal's foreground job does, whoever started the test
run: a POSIX shell starts a background job (`make test &` in a script, a CI step) with SIGINT
ignored, a child inherits that, and a Ctrl-C test would then see its signal vanish (the run
finishes, exit 0), which is what the test run's parent chose, not lungbench.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

# The first line of every held child's code: the fast tier's guard (conftest.starts_a_run)
# knows it for a lungbench run, as `-m lungbench` is.
RUN_MARK = "# a lungbench run held at a planted point (tests/planted.py)"

PRELUDE = (
    RUN_MARK
    + """
import importlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (module doc)
from pathlib import Path
module = importlib.import_module({module!r})
original = getattr(module, {function!r})
calls = []
def planted(*args, **kwargs):
    result = original(*args, **kwargs)
    calls.append(1)
    if len(calls) == {after}:
        Path({marker!r}).touch()
        while not Path({marker!r} + ".go").exists():  # held here until let go (or killed)
            time.sleep(0.02)
    return result
setattr(module, {function!r}, planted)
from lungbench.cli import main
sys.exit(main({argv!r}))
"""
)


def held_after(target: str, marker: Path, argv: list[str], after: int = 1) -> list[str]:
    """The command line of `lungbench ARGV` held after the `after`-th call of `target`
    ("package.module:function") returns. The function must be looked up through its module
    at call time (imported lazily by the command), or the wrapper is not the one called."""
    module, function = target.split(":")
    code = PRELUDE.format(
        module=module, function=function, after=after, marker=str(marker), argv=list(argv)
    )
    return [sys.executable, "-c", code]


def let_go(marker: Path) -> None:
    """Let the held child go on (after a signal it handles itself, e.g. SIGTERM: its handler
    has run by the time the child sees this file)."""
    Path(f"{marker}.go").touch()


def wait_for_marker(marker: Path, job: subprocess.Popen, limit_s: float = 240) -> None:
    """Wait until the child reached its planted point (it cannot finish on its own from
    there); fail with its exit code if it ended first."""
    deadline = time.monotonic() + limit_s
    while not marker.exists():
        assert job.poll() is None, f"the child ended (exit {job.returncode}) before its point"
        assert time.monotonic() < deadline, f"the child did not reach its point in {limit_s} s"
        time.sleep(0.02)


def signalled_at(
    target: str,
    marker: Path,
    argv: list[str],
    signum: int,
    cwd: Path,
    env: Mapping[str, str],
) -> tuple[int, str]:
    """Run `lungbench ARGV` held after `target`'s first return (held_after), send it
    `signum` there, let it go and wait: (exit code, stderr). The child is killed if the test
    fails before it ends."""
    job = subprocess.Popen(
        held_after(target, marker, argv),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_marker(marker, job)
        job.send_signal(signum)
        let_go(marker)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    return job.returncode, err
