"""Batch-size finder: doubling then bisection finds a planted memory limit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lungbench.cli import main
from lungbench.core.errors import is_oom
from lungbench.core.runs import read_records
from lungbench.harness.batch_finder import cap_configs, family, find_max_batch, training_trial
from lungbench.harness.sweep import BenchConfig
from lungbench.measure.workload import Workload
from lungbench.switches import Switches

CPU = torch.device("cpu")
SHAPES = [(1, 4, 5, 6)]


class PlantedLimit(nn.Module):
    """A model that 'runs out of memory' above `limit` samples, like the CUDA allocator."""

    def __init__(
        self,
        limit: int,
        error: type[Exception] = torch.cuda.OutOfMemoryError,
        message: str = "CUDA out of memory. Tried to allocate 2.00 GiB",
    ) -> None:
        super().__init__()
        self.limit, self.error, self.message = limit, error, message
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error(self.message)
        return self.conv(x).mean(dim=(1, 2, 3, 4)).unsqueeze(1)


@pytest.mark.parametrize("limit", [1, 2, 37, 64, 100])
def test_finds_a_planted_limit_with_few_trials(limit):
    search = find_max_batch(lambda b: b <= limit, limit=100)
    assert search.largest == limit
    assert len(search.tried) <= 2 * 7 + 1  # doubling + bisection: O(log limit)
    if limit == 100:
        assert search.capped and search.first_failure is None
    else:
        assert search.first_failure == limit + 1 or search.first_failure > limit


def test_nothing_fits_and_bad_bounds():
    assert find_max_batch(lambda b: False).largest == 0
    with pytest.raises(ValueError):
        find_max_batch(lambda b: True, start=4, limit=2)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (torch.cuda.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB"),
        (RuntimeError, "CUDA error: out of memory"),
        (RuntimeError, "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1"),
    ],
)
def test_training_trial_catches_the_allocators_errors(error, message):
    model = PlantedLimit(37, error, message)
    fits = training_trial(model, SHAPES, CPU, Switches(), ram_budget=float("inf"))
    search = find_max_batch(fits, limit=256)
    assert search.largest == 37 and search.first_failure == 38
    assert model.calls[-1] in (37, 38)
    assert is_oom(error(message))


def test_other_errors_are_not_taken_for_out_of_memory():
    model = PlantedLimit(3, ValueError, "shape mismatch")
    fits = training_trial(model, SHAPES, CPU, Switches(), ram_budget=float("inf"))
    assert fits(2)
    with pytest.raises(ValueError):
        fits(4)


def test_cpu_budget_refuses_a_batch_predicted_not_to_fit():
    model = PlantedLimit(1000)
    fits = training_trial(model, SHAPES, CPU, Switches(), ram_budget=10_000)
    search = find_max_batch(fits, limit=1000)
    # Saved activations at batch 1: the input (480 B) and the conv output (960 B), so the
    # 10 kB budget allows 6 samples; larger batches are never run.
    assert 1 <= search.largest < 1000 and max(model.calls) <= search.largest
    assert search.first_failure == search.largest + 1


def test_cap_configs_drops_larger_batches_and_adds_the_largest():
    base = BenchConfig(Workload(filters=2))
    configs = [base.with_workload(batch_size=b) for b in (2, 4, 8)]
    capped = cap_configs(configs, {family(base): 5})
    assert [c.workload.batch_size for c in capped] == [2, 4, 5]


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_cli_find_batch_bounds_the_sweep(tmp_path, capsys, tiny_store):
    code = main(
        [
            "bench",
            "--store",
            str(tiny_store),
            "--preset",
            "dey2018",
            "--filters",
            "2",
            "--batch",
            "2",
            "8",
            "--find-batch",
            "--max-batch",
            "4",
            "--no-epoch",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--telemetry-interval",
            "0",
            "--out",
            str(tmp_path),
            "--run-id",
            "fb",
        ]
    )
    assert code == 0, capsys.readouterr().err
    table = (tmp_path / "fb" / "tables" / "max_batch.csv").read_text()
    assert "max_batch" in table and "dualpath3d" in table
    records = read_records(tmp_path / "fb")
    assert sorted(r["batch_size"] for r in records) == [2, 4]  # 8 > the limit; 4 added
