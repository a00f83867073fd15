"""The gap per operator (lungbench.predict.roofline): the arithmetic on planted calls."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lungbench.measure.timing import OpCall
from lungbench.predict.devices import load_profiles
from lungbench.predict.roofline import OUTSIDE, OVERHEAD, STEP, roofline_table


def _device():
    # 1 TFLOP/s fp32, 100 GB/s, no curve: bounds by hand
    cpu = load_profiles()["cpu"]
    return replace(
        cpu, peak_flops={"fp32": 1e12}, conv_flops={}, memory_bandwidth=1e11, bandwidth_curve=()
    )


def test_roofline_table_sums_per_operator_and_shows_the_overheads():
    calls = [
        OpCall("aten.convolution", 2e9, 1e6, "fp32", "forward", 0.004),  # compute 2 ms
        OpCall("aten.convolution", 2e9, 1e6, "fp32", "forward", 0.006),
        OpCall("aten.max_pool3d", 0.0, 3e8, "fp32", "forward", 0.005),  # memory 3 ms
    ]
    t = roofline_table(calls, step_s=0.020, device=_device(), alone={0: 0.003, 1: 0.003})
    conv, pool = t.loc["aten.convolution"], t.loc["aten.max_pool3d"]
    assert conv["calls"] == 2 and conv["step_ms"] == pytest.approx(10.0)
    assert conv["bound_ms"] == pytest.approx(4.0) and conv["bound"] == "compute"
    assert conv["alone_ms"] == pytest.approx(6.0) and conv["x_bound"] == pytest.approx(2.5)
    assert pool["bound"] == "memory" and pool["bound_ms"] == pytest.approx(3.0)
    assert pool["alone_ms"] is None or pool["alone_ms"] != pool["alone_ms"]  # none made alone
    assert list(t.index[:2]) == ["aten.convolution", "aten.max_pool3d"]  # by time in step
    assert t.loc[STEP, "step_ms"] == pytest.approx(20.0)
    assert t.loc[STEP, "bound_ms"] == pytest.approx(7.0)
    assert t.loc[OUTSIDE, "step_ms"] == pytest.approx(20.0 - 15.0)
    # alone: 6 ms of convolutions + the pool's 5 ms in-step time (it has no alone time)
    assert t.loc[STEP, "alone_ms"] == pytest.approx(11.0)
    assert t.loc[OVERHEAD, "step_ms"] == pytest.approx(9.0)
