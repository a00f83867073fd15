"""The timing protocol against a fake workload of known duration."""

from __future__ import annotations

import pytest
import torch

from lungbench.measure.timing import (
    STEP,
    PhaseTimer,
    peak_memory_bytes,
    run_protocol,
    set_threads,
    training_step_flops,
)
from lungbench.step import TrainStep
from lungbench.switches import Switches


class PlantedClock:
    """A clock that moves only when the fake workload says so: the protocol's arithmetic is
    checked exactly, whatever else the machine is doing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def test_phases_of_a_known_workload():
    clock = PlantedClock()
    calls = []

    def step(timer: PhaseTimer) -> None:
        calls.append(1)
        with timer.phase("forward"):
            clock.spend(0.010)
        clock.spend(0.001)  # between phases: in the step, in no phase
        with timer.phase("backward"):
            clock.spend(0.020 + 0.001 * len(calls))  # grows by 1 ms a call
        with timer.phase("optimizer"):
            clock.spend(0.005)

    samples = run_protocol(step, PhaseTimer(torch.device("cpu"), clock), warmup=2, repeats=5)
    assert len(calls) == 7, "warm-up calls run but are not recorded"
    assert set(samples) == {"forward", "backward", "optimizer", STEP}
    assert all(len(v) == 5 for v in samples.values())
    assert samples["forward"] == pytest.approx([0.010] * 5)
    assert samples["optimizer"] == pytest.approx([0.005] * 5)
    # The timed repeats are calls 3..7 (the two warm-up calls are off the clock).
    assert samples["backward"] == pytest.approx([0.020 + 0.001 * n for n in range(3, 8)])
    for i in range(5):
        phases = sum(samples[p][i] for p in ("forward", "backward", "optimizer"))
        assert samples[STEP][i] == pytest.approx(phases + 0.001)  # the gap between phases


def test_training_step_updates_the_model():
    """The one step (lungbench.step.TrainStep) with a given optimizer, its phases timed."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timer = PhaseTimer(torch.device("cpu"))
    timer.start()
    step = TrainStep(
        model,
        lambda out, y: ((out - y) ** 2).mean(),
        Switches(),
        torch.device("cpu"),
        optimizer=opt,
    )
    loss = step(timer, [torch.randn(8, 4)], torch.randn(8, 1))
    times = timer.finish()
    assert loss.ndim == 0 and not loss.requires_grad
    assert not torch.equal(before, model.weight)
    assert set(times) == {"forward", "backward", "optimizer", STEP}


def test_flops_of_a_linear_layer():
    # Linear 16 -> 8 on batch 4: forward 2*4*16*8 = 1024 FLOPs; backward computes grad of
    # weight (1024) and of the input (1024): 3072 in all.
    model = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    flops = training_step_flops(model, lambda out, y: out.sum(), [x], torch.zeros(1))
    assert flops == 3072


def test_threads_are_set_and_reported():
    assert set_threads(1) == 1
    assert set_threads(None) == 1
    set_threads(2)


def test_cpu_peak_memory_is_process_rss():
    peak, kind = peak_memory_bytes(torch.device("cpu"))
    assert kind == "process_peak_rss" and peak > 10 * 2**20


def test_progress_inside_a_configuration_is_reported():
    """Warm-up and repeats are reported to whoever shows progress (a bar), throttled."""
    from lungbench.measure.timing import report, reporting

    shown: list[str] = []
    report("nobody listens")  # no reporter: nothing happens
    with reporting(shown.append, every_s=0.0):
        run_protocol(lambda t: None, PhaseTimer(torch.device("cpu")), warmup=2, repeats=3)
    assert shown == ["warm-up 1/2", "warm-up 2/2", "repeat 1/3", "repeat 2/3", "repeat 3/3"]
    throttled: list[str] = []
    with reporting(throttled.append, every_s=60.0):
        run_protocol(lambda t: None, PhaseTimer(torch.device("cpu")), warmup=2, repeats=3)
    assert throttled == ["warm-up 1/2"]
