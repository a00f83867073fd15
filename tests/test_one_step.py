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
