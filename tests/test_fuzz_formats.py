"""Fuzzing our own formats (issue #25): hypothesis writes arbitrary JSON values into the
measurement caches, arbitrary values into a device profile's TOML and into reproduce.json.
Each reader must either take the file (and then hold only values it can use) or refuse it
in one lungbench error naming the file; never another exception, never a traceback.

The default run tries FUZZ_EXAMPLES examples per format; `LUNGBENCH_FUZZ_EXAMPLES=1000
pytest tests/test_fuzz_formats.py` is the issue's full count (about a minute)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lungbench.core.cache import SCHEMAS, VERSION, read_cache
from lungbench.core.errors import LungbenchError
from lungbench.core.runlock import holds, unlock_run
from lungbench.core.runs import create_run_dir, finish_run
from lungbench.experiments import reproduce
from lungbench.harness import tuning  # noqa: F401 - registers its cache schema
from lungbench.measure import peak_cache  # noqa: F401 - registers its cache schema
from lungbench.predict import devices, forecast, kernels  # noqa: F401 - register schemas
from lungbench.predict.devices import parse_profile, shipped_profiles

# LUNGBENCH_FUZZ_EXAMPLES: fewer examples for the fast tier (the Makefile's test-fast).
FUZZ_EXAMPLES = int(os.environ.get("LUNGBENCH_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # a busy machine is no failure
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


# ---------------------------------------------------------------------------- the caches


@FUZZ
@given(
    name=st.sampled_from(sorted(SCHEMAS)),
    entries=st.dictionaries(st.text(max_size=10), JSON, max_size=5),
)
def test_a_cache_file_of_any_values_keeps_only_valid_entries(tmp_path_factory, name, entries):
    folder = tmp_path_factory.mktemp("cache")
    (folder / name).write_text(json.dumps({"version": VERSION, "entries": entries}))
    before = os.environ.get("LUNGBENCH_CACHE_DIR")  # the session's own (conftest)
    os.environ["LUNGBENCH_CACHE_DIR"] = str(folder)
    try:
        kept = read_cache(name)
    finally:  # put back, not removed: later tests must not fall back to ~/.cache
        if before is None:
            os.environ.pop("LUNGBENCH_CACHE_DIR")
        else:
            os.environ["LUNGBENCH_CACHE_DIR"] = before
    assert set(kept) <= set(entries)
    assert all(SCHEMAS[name](value) for value in kept.values())


# ---------------------------------------------------------------------- device profiles

V100 = (Path(devices.__file__).parent / "devices" / "v100-sxm2.toml").read_text()
FIELDS = ["peak_flops.fp32", "memory.bandwidth", "memory.size", "interconnect.bandwidth",
          "interconnect.latency", "launch.kernel", "efficiency.compute", "efficiency.memory"]  # fmt: skip
TOML_VALUES = (
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda v: (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    )
    | st.integers(min_value=-(2**40), max_value=2**40).map(str)
    | st.sampled_from(['"fast"', "true", "[]", "{}", '""'])
)


def _with_value(text: str, field: str, value: str) -> str:
    section, key = field.split(".")
    head, _, body = text.partition(f"[{section}]")
    line_start = body.index(f"{key} = {{ value = ")
    value_start = line_start + len(f"{key} = {{ value = ")
    value_end = body.index(",", value_start)
    return f"{head}[{section}]{body[:value_start]}{value}{body[value_end:]}"


@FUZZ
@given(field=st.sampled_from(FIELDS), value=TOML_VALUES)
def test_a_device_profile_of_any_value_is_usable_or_one_error(field, value):
    text = _with_value(V100, field, value)
    try:
        profile = parse_profile(text, "fuzzed.toml")
    except LungbenchError as exc:
        assert "fuzzed.toml" in str(exc) and "\n" not in str(exc)
        return
    numbers = [*profile.peak_flops.values(), profile.memory_bandwidth, profile.memory_size,
               profile.link_bandwidth]  # fmt: skip
    assert all(math.isfinite(n) and n > 0 for n in numbers)
    assert 0 < profile.compute_efficiency <= 1 and 0 < profile.memory_efficiency <= 1
    assert profile.link_latency_s >= 0 and profile.kernel_launch_s >= 0


def test_the_shipped_profiles_pass_their_own_checks():
    assert len(shipped_profiles()) >= 7


# ----------------------------------------------------------------------- reproduce.json


def _reproduction(root: Path) -> Path:
    run = create_run_dir(root, reproduce.NAME, "r")
    finish_run(run, "interrupted")
    return run


STATE = {
    "config": {"twins": ["speedup", "mosmed"], "quick": True, "device": "cpu"},
    "twins": {
        "speedup": {"status": "complete", "run_dir": "speedup", "attempts": 1, "wall_s": 3.0},
        "mosmed": {"status": "interrupted", "run_dir": "mosmed", "attempts": 1},
    },
}
PLACES = [("config", "twins"), ("config", "quick"), ("config", "device"), ("twins",),
          ("twins", "speedup"), ("twins", "mosmed", "run_dir"), ("twins", "mosmed", "status"),
          ("twins", "speedup", "attempts"), ("twins", "speedup", "wall_s"), ()]  # fmt: skip


def _planted(place: tuple[str, ...], value) -> object:
    state = json.loads(json.dumps(STATE))
    if not place:
        return value
    target = state
    for key in place[:-1]:
        target = target[key]
    target[place[-1]] = value
    return state


@FUZZ
@given(place=st.sampled_from(PLACES), value=JSON)
def test_a_reproduce_json_of_any_value_resumes_or_is_one_error(tmp_path_factory, place, value):
    run = _reproduction(tmp_path_factory.mktemp("out"))
    (run / reproduce.STATE_FILE).write_text(json.dumps(_planted(place, value)))
    try:
        plan = reproduce.plan_resume(run, run.parent)
    except LungbenchError as exc:
        assert "\n" not in str(exc)
        assert not holds(run), "a refused resume releases the folder"
        return
    for twin, state in plan.states.items():  # what it took stays inside the reproduction
        if state.run_dir:
            assert (run / state.run_dir).resolve().is_relative_to(run.resolve()), twin
    unlock_run(run)


@pytest.mark.parametrize("folder", ["../elsewhere", "/tmp", "a/../../b"])
def test_a_twin_folder_that_leaves_the_reproduction_is_refused(tmp_path, folder):
    run = _reproduction(tmp_path)
    state = _planted(("twins", "mosmed", "run_dir"), folder)
    (run / reproduce.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(LungbenchError, match="outside the reproduction folder"):
        reproduce.plan_resume(run, run.parent)


# ------------------------------------------------------------------------ records.jsonl

RECORD = {"key": "dualpath3d|dey2018|f2|b2|cpu|t1", "status": "ok", "model": "dualpath3d",
          "batch_size": 2, "filters": 2, "threads_used": 1, "world_size": 1,
          "step_s_median": 0.02, "epoch_s": 1.5, "flops_per_step": 1e8}  # fmt: skip


@FUZZ
@given(field=st.sampled_from(sorted(RECORD)), value=JSON)
def test_a_record_of_any_value_is_read_or_one_error_naming_its_line(tmp_path_factory, field, value):
    from lungbench.core.runs import RECORDS_FILE, read_records

    run = tmp_path_factory.mktemp("run")
    lines = [json.dumps(RECORD), json.dumps({**RECORD, field: value}), '{"torn": ']
    (run / RECORDS_FILE).write_text("\n".join(lines))
    try:
        records = read_records(run)
    except LungbenchError as exc:
        assert f"{RECORDS_FILE}: line 2: field {field!r}" in str(exc) and "\n" not in str(exc)
        return
    assert len(records) == 2 and records[1][field] == value  # the torn line skipped
