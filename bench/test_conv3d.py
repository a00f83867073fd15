"""conv3d forward and backward at the thesis's filter counts (8, 16) on the preset grids.

The first convolution of a path (1 -> filters channels on the whole grid) dominates the
two-path model's time; `deep` is the second level (filters -> 2 x filters on half the grid).
Each case records its achieved FLOP/s and, as `peak_fraction`, its share of the device's
fp32 matrix-product peak (lungbench.measure.peak, measured once per session and device).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lungbench.data.geometry import geometry
from lungbench.measure.peak import matmul_peak_flops

PRESETS = ["dey2018", "default", "iso64"]
QUICK_PRESETS = {"dey2018"}
BATCH = 2
# Quick mode measures the peak on a smaller product (well under a second on 2 CPU cores).
QUICK_PEAK = {"size": 1024, "repeats": 2}


@pytest.fixture(scope="session")
def peak_flops(quick):
    """`peak_flops(device)`: fp32 matrix-product peak of `device`, measured on first use."""
    measured: dict[str, float] = {}

    def peak(device: torch.device) -> float:
        if str(device) not in measured:
            measured[str(device)] = matmul_peak_flops(
                device, "fp32", **(QUICK_PEAK if quick else {})
            )
        return measured[str(device)]

    return peak


def conv_case(preset: str, filters: int, level: str, device: torch.device):
    """(layer, input) of the first or second conv level on `preset`'s context grid."""
    grid = geometry(preset).context_grid
    if level == "first":
        c_in, c_out, shape = 1, filters, grid
    else:
        c_in, c_out, shape = filters, 2 * filters, tuple(max(1, s // 2) for s in grid)
    conv = nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=False).to(device)
    x = torch.randn(BATCH, c_in, *shape, device=device)
    return conv, x


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def record(benchmark, preset: str, filters: int, level: str, flops: int, peak: float) -> None:
    benchmark.extra_info.update(
        preset=preset, filters=filters, level=level, batch=BATCH, flops=flops, peak_flops=peak
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        achieved = flops / stats.stats.median
        benchmark.extra_info.update(achieved_flops=achieved, peak_fraction=achieved / peak)


def _skip(quick: bool, preset: str, filters: int, level: str) -> None:
    if quick and (preset not in QUICK_PRESETS or filters != 8 or level != "first"):
        pytest.skip("trimmed in quick mode")


@pytest.mark.parametrize("level", ["first", "deep"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("filters", [8, 16])
def test_conv3d_forward(benchmark, run_timed, quick, peak_flops, device, filters, preset, level):
    _skip(quick, preset, filters, level)
    benchmark.group = f"conv3d-forward-{preset}"
    conv, x = conv_case(preset, filters, level, device)
    flops = count_flops(lambda: conv(x))
    out = run_timed(lambda: conv(x), device)
    assert out.shape[1] == conv.out_channels
    record(benchmark, preset, filters, level, flops, peak_flops(device))


@pytest.mark.parametrize("level", ["first", "deep"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("filters", [8, 16])
def test_conv3d_backward(benchmark, run_timed, quick, peak_flops, device, filters, preset, level):
    _skip(quick, preset, filters, level)
    benchmark.group = f"conv3d-backward-{preset}"
    conv, x = conv_case(preset, filters, level, device)
    # Deeper levels also need the gradient of their input; the first level only the weights'.
    x.requires_grad_(level != "first")

    def setup():
        conv.weight.grad = None
        y = conv(x)
        return (y, torch.ones_like(y)), {}

    y, grad = setup()[0]
    flops = count_flops(lambda: y.backward(grad))
    run_timed(lambda y, grad: y.backward(grad), device, setup=setup)
    assert conv.weight.grad is not None
    record(benchmark, preset, filters, level, flops, peak_flops(device))
