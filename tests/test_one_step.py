"""One step: what `bench` times is what `profile` traces and what the training engine trains.

Also: a run folder written by lungbench 0.1.0 before the package was put in layers
(tests/fixtures/bench-v0.1.0, records only) still reports and compares.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from lungbench.cli import main
from lungbench.core.runs import read_records
from lungbench.distributed.group import single_process
from lungbench.step import NO_TIMER, TrainStep, bce_loss
from lungbench.switches import Switches
from lungbench.train.config import TrainConfig
from lungbench.train.engine import epoch_order, fit

FIXTURE = Path(__file__).parent / "fixtures" / "bench-v0.1.0"
SWITCHES_USED = (
    "memory_format_used",
    "dtype_used",
    "compile_used",
    "optimizer_used",
    "tf32_used",
    "cudnn_benchmark_used",
    "cuda_graphs_used",
)


def test_bench_and_profile_of_the_same_options_run_the_same_step(tmp_path, capsys, tiny_store):
    common = [
        "--preset",
        "dey2018",
        "--filters",
        "2",
        "--batch",
        "2",
        "--optimizer-impl",
        "foreach",
    ]
    assert (
        main(
            [
                "bench",
                *common,
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--no-epoch",
                "--store",
                str(tiny_store),
                "--out",
                str(tmp_path),
                "--run-id",
                "b",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "profile",
                *common,
                "--wait",
                "0",
                "--warmup",
                "0",
                "--active",
                "1",
                "--out",
                str(tmp_path),
                "--run-id",
                "p",
            ]
        )
        == 0
    )
    capsys.readouterr()
    (bench,) = read_records(tmp_path / "b")
    profile = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert {k: profile[k] for k in SWITCHES_USED} == {k: bench[k] for k in SWITCHES_USED}
    assert profile["optimizer_used"] == "foreach"  # the forced switch reached both
    assert profile["flops_per_step"] == bench["flops_per_step"] > 0


class _Pairs(Dataset):
    """Two-input samples ((context, zoom), label) with float 0/1 labels."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.a = torch.rand((n, 1, 6, 6, 6), generator=g)
        self.b = torch.rand((n, 1, 6, 6, 6), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, k: int):
        return (self.a[k], self.b[k]), self.y[k]


class _TwoPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, 2, 3)
        self.b = nn.Conv3d(1, 2, 3)
        self.head = nn.Linear(4, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pooled = [self.a(a).mean((2, 3, 4)), self.b(b).mean((2, 3, 4))]
        return self.head(torch.cat(pooled, 1))


def test_engine_and_bench_step_give_the_same_loss_after_n_steps():
    """fit() for one epoch and the bench's TrainStep over the same batches in the same order
    end with the same loss and bit-identical weights."""
    torch.manual_seed(0)
    start = _TwoPath().state_dict()
    data, n_steps, batch = _Pairs(24), 6, 4
    config = TrainConfig(
        epochs=1, batch_size=batch, lr=3e-2, progress=False, log_epochs=False, tensorboard=False
    )

    trained = _TwoPath()
    trained.load_state_dict(start)
    result = fit(trained, data, data, _no_restore(config))

    bench_model = _TwoPath()
    bench_model.load_state_dict(start)
    step = TrainStep(bench_model, bce_loss, Switches(), torch.device("cpu"), lr=config.lr)
    order = epoch_order(len(data), 0, config, single_process(), shuffle=True)
    losses = []
    for i in range(n_steps):
        idx = order[i * batch : (i + 1) * batch]
        inputs = [data.a[idx], data.b[idx]]
        losses.append(float(step(NO_TIMER, inputs, data.y[idx])))

    assert result.history["train_loss"].iloc[0] == pytest.approx(sum(losses) / n_steps, rel=1e-12)
    for name, value in trained.state_dict().items():
        assert torch.equal(value, bench_model.state_dict()[name]), name


def _no_restore(config: TrainConfig) -> TrainConfig:
    from dataclasses import replace

    return replace(config, restore_best=False)


def test_a_run_folder_of_lungbench_0_1_0_reports_and_compares(tmp_path, capsys):
    run = tmp_path / FIXTURE.name
    shutil.copytree(FIXTURE, run)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").stat().st_size > 1000
    assert main(["compare", str(run), str(run)]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| dualpath3d")]
    verdicts = {(row[1], row[-1].rstrip(" |")) for row in rows}
    # a run against itself: every step the same (ratio 1), every single epoch unreliable
    assert verdicts == {("step", "same"), ("epoch", "unreliable (one epoch each)")}, out
    assert {row[4] for row in rows} == {"1.000"}
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == {"faster": 0, "slower": 0, "same": 2}


_DDP_LAYOUT_SCRIPT = """
import sys, tempfile, warnings
import torch
from torch import nn
from lungbench.distributed.group import DistContext, wrap_model
from lungbench.step import NO_TIMER, TrainStep, bce_loss, distributed_model
from lungbench.switches import Switches

store = tempfile.NamedTemporaryFile(delete=False).name
torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
model = nn.Sequential(
    nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 3),
    nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 1),
)
switches = Switches(
    memory_format="channels_last_3d", dtype="fp32", optimizer="default", ddp_bucket_mb=1
)
dist = DistContext(world_size=2, backend="gloo")  # wrap in DDP; the group itself has 1 rank
if sys.argv[1] == "wrapped-then-laid-out":  # the order the bug had: DDP first, TrainStep after
    ddp = wrap_model(model, dist)
else:
    ddp = distributed_model(model, dist, switches)
step = TrainStep(ddp, bce_loss, switches, torch.device("cpu"))
inputs = step.prepare_inputs([torch.randn(2, 1, 8, 8, 8)])
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    for _ in range(2):
        step(NO_TIMER, inputs, torch.tensor([[0.0], [1.0]]))
print("BUCKET", ddp.bucket_bytes_cap)
print("STRIDES-WARNED" if any("Grad strides" in str(w.message) for w in seen) else "CLEAN")
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("order", "expected"),
    [("wrapped-then-laid-out", "STRIDES-WARNED"), ("distributed_model", "CLEAN")],
)
def test_a_ddp_model_is_laid_out_before_ddp_builds_its_gradient_buckets(order, expected):
    """Every DDP step (bench's ranks, training, predict's ranks side by side) is built by
    `distributed_model`: the memory format first, so DDP's bucket views have the gradients'
    channels-last strides. Built the other way round (the first case, which shows the check
    can fail), each synced step copies every gradient and torch warns on the user's terminal.
    Each case in its own interpreter: torch gives that warning once per process."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _DDP_LAYOUT_SCRIPT, order],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected
    if order == "distributed_model":  # the switches' bucket size, whoever builds the step
        assert f"BUCKET {1024 * 1024}" in done.stdout
