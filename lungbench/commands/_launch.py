"""Layer 12 (commands): `lungbench bench` in a subprocess, for what `lungbench predict` measures
with the real command: its validation's epochs and DDP steps, and the DDP overhead probe.
Only the commands may start a `lungbench` process (tests/test_layers.py holds that); the
predict layer receives this function as its `launch` argument.

    records, environment = bench_subprocess(["--preset", "dey2018", "--no-epoch"], ranks=2)

A child process keeps the measurement away from this process's threads and state (and a
torchrun launch needs one); an outer launcher's variables are removed so the inner run is
its own job.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lungbench.core.runs import read_json, read_records

log = logging.getLogger(__name__)

RUN_ID = "predict-measure"


def bench_subprocess(
    bench_args: list[str], ranks: int = 1, out: Path | None = None, timeout_s: float = 900
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(ok records, environment) of `lungbench bench BENCH_ARGS`, under torchrun when
    `ranks` > 1, its run folder under `out` (default: a temporary folder); ([], {}) with a
    warning when the run failed."""
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out) if out is not None else Path(tmp)
        argv = [*launch, "-m", "lungbench", "bench", *bench_args]
        argv += ["--telemetry-interval", "0", "--out", str(root), "--run-id", RUN_ID]
        env = {k: v for k, v in os.environ.items() if not launcher_variable(k)}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:]
            log.warning(f"note: `lungbench bench` ({ranks} process(es)) failed: {last}")
            return [], {}
        run = root / RUN_ID
        records = [r for r in read_records(run) if r.get("status") == "ok"]
        env_path = run / "environment.json"
        return records, (read_json(env_path) if env_path.is_file() else {})


def launcher_variable(name: str) -> bool:
    """Variables of an outer launcher that would confuse the inner torchrun."""
    return name in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} or (
        name.startswith(("SLURM_", "PMI_", "OMPI_", "TORCHELASTIC_"))
    )
