"""The full two-path training step (forward, BCE loss, backward, Adam) at batch 2.

The same step `lungbench bench` times, here under pytest-benchmark so that saved runs can be
compared with `pytest-benchmark compare`. extra_info carries FLOPs per step (FlopCounterMode)
and the achieved FLOP/s.
"""

from __future__ import annotations

import pytest
import torch

from lungbench.data.geometry import geometry
from lungbench.measure.timing import training_step_flops
from lungbench.models import create_model
from lungbench.step import bce_loss

PRESETS = ["dey2018", "default", "iso64"]
BATCH = 2


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("filters", [8, 16])
def test_train_step(benchmark, run_timed, quick, device, filters, preset):
    if quick and (preset != "dey2018" or filters != 8):
        pytest.skip("trimmed in quick mode")
    benchmark.group = f"train-step-{preset}"
    geo = geometry(preset)
    model = create_model("dualpath3d", preset=preset, filters=filters).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs = [
        torch.rand(BATCH, 1, *grid, device=device) for grid in (geo.context_grid, geo.zoom_grid)
    ]
    target = torch.randint(0, 2, (BATCH,), device=device).float()
    flops = training_step_flops(model, bce_loss, inputs, target)

    def step() -> torch.Tensor:
        loss = bce_loss(model(*inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    loss = run_timed(step, device, rounds=5)
    assert torch.isfinite(loss)
    benchmark.extra_info.update(preset=preset, filters=filters, batch=BATCH, flops=flops)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["achieved_flops"] = flops / stats.stats.median
