"""The pytest-benchmark suite in bench/ runs in quick mode (as CI runs it) and saves machine
info extended with the lungbench environment record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the fast tier starts no process and trains nothing
@pytest.mark.timeout(420)  # above its own subprocess limits, which say what hung
def test_bench_suite_quick_mode(tmp_path):
    report = tmp_path / "bench.json"
    # Not an xdist worker's variables: the inner pytest would take itself for one, and
    # pytest-benchmark turns itself off under xdist.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env |= {"LUNGBENCH_BENCH_QUICK": "1", "LUNGBENCH_BENCH_THREADS": "2"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "bench/",
            "--benchmark-only",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--benchmark-json={report}",
            f"--basetemp={tmp_path / 'b'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(report.read_text())
    names = {b["name"].split("[")[0] for b in data["benchmarks"]}
    assert {
        "test_conv3d_forward",
        "test_conv3d_backward",
        "test_train_step",
        "test_hdf5_batch_read",
        "test_augment_item",
    } <= names
    for bench in data["benchmarks"]:
        assert bench["stats"]["rounds"] == 1 and bench["stats"]["median"] > 0
    step = next(b for b in data["benchmarks"] if b["name"].startswith("test_train_step"))
    assert step["extra_info"]["flops"] > 0 and step["extra_info"]["device"] == "cpu"
    machine = data["machine_info"]
    assert machine["lungbench_quick"] is True
    assert machine["lungbench"]["torch"]["version"] and "cpu" in machine["lungbench"]
