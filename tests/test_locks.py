"""One writer per run folder (lungbench.core.runlock): a second writer is refused in one line
naming the holder, a killed holder's lock is taken over, run folders are created atomically,
and paths read from a reproduction's state file stay inside it."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from lungbench.core import runlock
from lungbench.core.errors import DataError, UsageError
from lungbench.core.runs import append_record, create_run_dir, finish_run, read_records, write_json
from lungbench.experiments import reproduce
from lungbench.harness.sweep_state import open_for_resume

FORK = multiprocessing.get_context("fork")


def _hold(run_dir, ready, release):
    """In a child process: take the folder's lock, say so, keep it until told."""
    runlock.lock_run(run_dir)
    ready.set()
    release.wait(30)


@pytest.fixture
def held_elsewhere():
    """Start a child process holding a folder's lock; yields (start(run_dir) -> pid)."""
    children = []

    def start(run_dir):
        ready, release = FORK.Event(), FORK.Event()
        child = FORK.Process(target=_hold, args=(run_dir, ready, release))
        child.start()
        assert ready.wait(30)
        children.append((child, release))
        return child

    yield start
    for child, release in children:
        if child.is_alive():  # a killed child's Event would hang set()
            release.set()
            child.join(10)
        if child.is_alive():
            child.kill()


def _bench_folder(tmp_path, status="interrupted"):
    run = create_run_dir(tmp_path, "bench", "b")
    write_json(run / "config.json", {"request": {"filters": [4]}})
    append_record(run, {"config": "b4", "status": "ok"})
    finish_run(run, status)  # releases the lock, as an interrupted run's process does
    return run


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, held_elsewhere):
    run = _bench_folder(tmp_path)
    child = held_elsewhere(run)
    with pytest.raises(UsageError) as err:
        open_for_resume(run)
    message = str(err.value)
    assert "\n" not in message
    assert f"pid {child.pid} on " in message and "in use" in message
    assert not runlock.holds(run)


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, held_elsewhere):
    run = _bench_folder(tmp_path)
    child = held_elsewhere(run)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert f"pid {child.pid} " in runlock.holder(run)  # its note is left behind, stale
    point = open_for_resume(run)  # the kernel dropped the lock with the process
    assert runlock.holds(run)
    assert f"pid {os.getpid()} " in runlock.holder(run)
    assert len(point.records) == 1
    runlock.unlock_run(run)


def test_a_run_holds_its_folder_until_it_finishes(tmp_path, held_elsewhere):
    run = create_run_dir(tmp_path, "bench", "b")
    assert runlock.holds(run)
    runlock.lock_run(run)  # re-entrant within the process
    finish_run(run, "complete")
    assert not runlock.holds(run)
    held_elsewhere(run)  # another process can take it now


def test_a_refused_resume_releases_what_it_took(tmp_path):
    run = create_run_dir(tmp_path, "train", "t")
    write_json(run / "config.json", {"experiment": "mosmed"})
    finish_run(run, "interrupted")
    with pytest.raises(UsageError, match="only 'bench' runs"):
        open_for_resume(run)
    assert not runlock.holds(run)


def _create(root, barrier, queue):
    barrier.wait(30)
    queue.put(create_run_dir(root, "bench", "same").name)


def test_synchronised_creations_get_distinct_folders(tmp_path):
    """Processes released together ask for one run id: each gets its own folder, none an
    error (FileExistsError in 19 of 40 tries before)."""
    n = 6
    barrier, queue = FORK.Barrier(n), FORK.Queue()
    children = [FORK.Process(target=_create, args=(tmp_path, barrier, queue)) for _ in range(n)]
    for child in children:
        child.start()
    names = sorted(queue.get(timeout=60) for _ in children)
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert len(set(names)) == n
    assert {p.name for p in tmp_path.iterdir()} == set(names)


@pytest.mark.timeout(420)  # above its own subprocess limits, which say what hung
@pytest.mark.slow
def test_two_bench_resumes_at_once_never_duplicate_a_record(tmp_path, held_elsewhere):
    """The first resume holds the folder (a child process, planted so the race is
    deterministic); the second, a real `lungbench bench --resume`, is refused in one line,
    exit 2, and writes nothing."""
    run = _bench_folder(tmp_path)
    child = held_elsewhere(run)
    before = (run / "records.jsonl").read_bytes(), (run / "run.json").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "lungbench", "bench", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"in use by pid {child.pid} on " in lines[0] and "lungbench" in lines[0]
    assert ((run / "records.jsonl").read_bytes(), (run / "run.json").read_bytes()) == before
    assert len(read_records(run)) == 1


def _reproduction(tmp_path, twin_dir):
    run = create_run_dir(tmp_path, reproduce.NAME, "r")
    state = {"config": {"twins": ["mosmed"], "quick": True, "device": "cpu"}, "twins": {}}
    state["twins"]["mosmed"] = {"run_dir": twin_dir, "status": "interrupted"}
    write_json(run / reproduce.STATE_FILE, state)
    finish_run(run, "interrupted")
    return run


@pytest.mark.parametrize("twin_dir", ["../../elsewhere", "/tmp", "..", "mosmed/../../x"])
def test_a_twin_folder_outside_the_reproduction_is_refused(tmp_path, twin_dir):
    run = _reproduction(tmp_path, twin_dir)
    with pytest.raises(DataError, match="outside the reproduction folder") as err:
        reproduce.plan_resume(run, tmp_path)
    assert "reproduce.json" in str(err.value) and "\n" not in str(err.value)
    assert not runlock.holds(run)


def test_a_twin_folder_inside_is_kept(tmp_path):
    run = _reproduction(tmp_path, "mosmed")
    p = reproduce.plan_resume(run, tmp_path)
    assert p.states["mosmed"].run_dir == "mosmed" and runlock.holds(run)
    runlock.unlock_run(run)


@pytest.mark.parametrize(
    "entry, says",
    [
        ([], "not an object"),
        ({"status": 3}, "field 'status' is 3"),
        ({"attempts": "two"}, "field 'attempts'"),
        ({"run_dir": 7}, "field 'run_dir'"),
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"estimate_s": float("nan")}, "field 'estimate_s' is nan, not a finite number"),
        ({"wall_s": -3.0}, "field 'wall_s' is -3.0"),
    ],
)
def test_a_twin_entry_of_the_wrong_type_is_one_line_in_words(tmp_path, entry, says):
    run = _reproduction(tmp_path, None)
    state = json.loads((run / reproduce.STATE_FILE).read_text())
    state["twins"]["mosmed"] = entry
    (run / reproduce.STATE_FILE).write_text(json.dumps(state))  # NaN as JSON writers spell it
    with pytest.raises(DataError, match="not a readable reproduction") as err:
        reproduce.plan_resume(run, tmp_path)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change, says",
    [
        ({"twins": []}, "'config' and 'twins' objects"),
        ({"config": ["mosmed"]}, "config is list"),
        ({"config": {"twins": ["speedupp"], "quick": True, "device": "cpu"}}, "unknown twin"),
    ],
)
def test_a_reproduce_json_of_the_wrong_shape_names_the_file_in_words(tmp_path, change, says):
    run = _reproduction(tmp_path, None)
    state = json.loads((run / reproduce.STATE_FILE).read_text())
    write_json(run / reproduce.STATE_FILE, {**state, **change})
    with pytest.raises(DataError, match="reproduce.json") as err:
        reproduce.plan_resume(run, tmp_path)
    assert says in str(err.value) and "--only" not in str(err.value)
