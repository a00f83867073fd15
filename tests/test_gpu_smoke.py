"""hpc/gpu_smoke.sh, the first run on a GPU node, in its dry mode (the same steps on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "bench", "tuning", "ablation", "ddp", "profile", "gpu-tests")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1000)  # above its own 900 s subprocess limit, which says what hung
def test_gpu_smoke_script_dry_run(tmp_path):
    out = tmp_path / "smoke"
    env = {**os.environ, "PYTHON": sys.executable, "STEP_TIMEOUT": "240"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        ["bash", str(REPO / "hpc" / "gpu_smoke.sh"), str(out), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = (out / "steps.log").read_text()
    assert proc.returncode == 0, proc.stderr
    for step in STEPS:
        assert f"ok      {step} " in log, log
    assert "done: 0 step(s) failed" in log
    assert (out / "environment.json").exists()
    results = out / "results"
    for run in ("thesis-table", "tuning", "ablation", "ddp-1gpu", "profile"):
        assert (results / run / "run.json").exists(), run
