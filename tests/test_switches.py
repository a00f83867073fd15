"""Speed switches: every CPU combination trains like FP32, fallbacks warn, forced ones fail."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from lungbench.core.errors import UsageError
from lungbench.harness.ablation import tolerance
from lungbench.models import create_model
from lungbench.models.dualpath3d import DualPath3D
from lungbench.step import NO_TIMER, TrainStep, bce_loss
from lungbench.switches import (
    Switches,
    apply_memory_format,
    auto_switches,
    backend_flags,
    bf16_supported,
    compiler_available,
    eager_fp32,
    fast_defaults,
    in_format,
    pools_in_input_dtype,
    resolve,
)

CPU = torch.device("cpu")
GRID = (7, 9, 10)  # small and odd-sized, as MONAI's tests


def tiny_model() -> DualPath3D:
    torch.manual_seed(0)
    model = DualPath3D(filters=2, depth=2, context_grid=GRID, zoom_grid=GRID, hidden=8)
    model.head[2].p = 0.0  # dropout off: every variant computes the same function
    return model


def batches(n: int = 3) -> list:
    g = torch.Generator().manual_seed(1)
    return [
        ([torch.rand(2, 1, *GRID, generator=g) for _ in range(2)], torch.tensor([0.0, 1.0]))
        for _ in range(n)
    ]


def loss_after_steps(switches: Switches, steps: int = 6, lr: float = 3e-2) -> float:
    """FP32 loss on the last batch after `steps` steps with `switches` from the same init.

    Two batches in turn at a high lr, so the loss moves by far more than any tolerance: a
    variant that did not train (or trained on garbage) cannot pass by staying put.
    """
    model = tiny_model().train()
    step = TrainStep(model, bce_loss, resolve(switches, CPU).switches, CPU, lr=lr)
    data = batches(2)
    with backend_flags(step.switches):
        for i in range(steps):
            inputs, target = data[i % 2]
            step(NO_TIMER, step.prepare_inputs(inputs), target)
    with torch.no_grad():
        return float(bce_loss(model(*data[-1][0]), data[-1][1]))


def initial_loss() -> float:
    data = batches(2)
    with torch.no_grad():
        return float(bce_loss(tiny_model().train()(*data[-1][0]), data[-1][1]))


DTYPES = ["fp32", "bf16"] if bf16_supported(CPU) else ["fp32"]
COMBOS = list(
    itertools.product(["contiguous", "channels_last_3d"], DTYPES, ["default", "foreach", "fused"])
)


@pytest.fixture(scope="module")
def fp32_loss() -> float:
    loss = loss_after_steps(eager_fp32())
    # The check below means something only if training moved the loss past every tolerance.
    assert initial_loss() - loss > 2 * tolerance(Switches(dtype="bf16"))
    return loss


@pytest.mark.parametrize(("memory_format", "dtype", "optimizer"), COMBOS)
def test_every_cpu_combination_matches_fp32(memory_format, dtype, optimizer, fp32_loss):
    switches = Switches(memory_format=memory_format, dtype=dtype, optimizer=optimizer)
    loss = loss_after_steps(switches)
    # Stated tolerances: 1e-3 absolute for FP32 arithmetic, 5e-2 for bf16 (ablation.TOLERANCE).
    assert abs(loss - fp32_loss) <= tolerance(switches), (switches, loss, fp32_loss)


def test_memory_format_converts_every_5d_tensor_and_inputs():
    model = apply_memory_format(tiny_model(), "channels_last_3d")
    conv = model.context_path.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    step = TrainStep(tiny_model(), bce_loss, Switches(memory_format="channels_last_3d"), CPU)
    x = step.prepare_inputs([torch.rand(2, 1, *GRID)])[0]
    assert x.is_contiguous(memory_format=torch.channels_last_3d)


def test_a_one_channel_input_is_viewed_channels_last_without_a_copy():
    x = torch.rand(2, 1, *GRID)
    viewed = in_format(x, "channels_last_3d")
    assert viewed.data_ptr() == x.data_ptr() and torch.equal(viewed, x)  # the same bytes
    assert viewed.stride() == (7 * 9 * 10, 1, 9 * 10, 10, 1)  # channels-last strides
    conv = torch.nn.Conv3d(1, 4, 3, padding=1)
    assert conv(viewed).is_contiguous(memory_format=torch.channels_last_3d)
    assert conv(x.contiguous(memory_format=torch.channels_last_3d)).is_contiguous()  # why
    assert in_format(x, "contiguous") is x
    assert in_format(viewed, "contiguous").stride() == x.stride()  # plain strides back
    wide = torch.rand(2, 3, *GRID)  # several channels: the plain conversion
    assert in_format(wide, "channels_last_3d").is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.skipif(not bf16_supported(CPU), reason="needs a CPU with bf16")
def test_max_pools_run_in_bf16_under_autocast_with_the_same_values(tmp_path):
    """CPU autocast runs max-pools in FP32, casting their bf16 input up and back. A max
    selects one of its inputs, so pooling in bf16 must give exactly the FP32 path's values
    and gradients, without the casts; FP32 switches give back plain max-pools."""
    model = tiny_model()
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool3d)]
    x = torch.randn(2, 3, 8, 8, 8, requires_grad=True)

    def pooled(pool):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = pool(x.to(torch.bfloat16))
        (grad,) = torch.autograd.grad(y.float().pow(2).sum(), x)
        return y, grad

    plain_y, plain_grad = pooled(pools[0])
    assert plain_y.dtype == torch.float32  # autocast's own policy: the pool in FP32
    step = TrainStep(model, bce_loss, Switches(dtype="bf16"), CPU)
    assert all(type(p).__name__ == "MaxPool3dInInputDtype" for p in pools)
    y, grad = pooled(pools[0])
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.float(), plain_y) and torch.equal(grad, plain_grad)
    torch.save(step.model, tmp_path / "model.pt")  # the swapped class still pickles
    assert set(torch.load(tmp_path / "model.pt", weights_only=False).state_dict()) == set(
        tiny_model().state_dict()
    )
    pools_in_input_dtype(model, autocast_on=False)
    assert all(type(p) is torch.nn.MaxPool3d for p in pools)


def test_channels_last_reaches_past_the_one_channel_convolution():
    """A 1-channel input is both contiguous and channels-last, so the first convolution
    would write its output contiguous and every layer after it would follow: the format
    views that input channels-last for every caller (here the model called directly, as
    evaluation calls it); going back to contiguous removes the hook."""
    model = tiny_model()
    features = model.context_path.features
    seen = []
    features[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.rand(2, 1, *GRID).contiguous(memory_format=torch.channels_last_3d)
    model(x, x)
    assert not seen[-1].is_contiguous(memory_format=torch.channels_last_3d)  # lost at once
    apply_memory_format(model, "channels_last_3d")
    apply_memory_format(model, "channels_last_3d")  # again: one hook, not two
    assert len(features[0]._forward_pre_hooks) == 1
    model(x, x)
    assert seen[-1].is_contiguous(memory_format=torch.channels_last_3d)
    apply_memory_format(model, "contiguous")
    assert not features[0]._forward_pre_hooks
    model(x.contiguous(), x.contiguous())
    assert seen[-1].is_contiguous()


@pytest.mark.parametrize(
    ("requested", "field", "ran"),
    [
        (Switches(dtype="fp16"), "dtype", "fp32"),
        (Switches(cuda_graphs=True), "cuda_graphs", False),
        (Switches(tf32=True), "tf32", False),
        (Switches(cudnn_benchmark=True), "cudnn_benchmark", False),
    ],
)
def test_cpu_cannot_do_falls_back_with_a_warning(requested, field, ran, capsys, stderr_log):
    resolved = resolve(requested, CPU)
    assert getattr(resolved.switches, field) == ran
    assert len(resolved.fallbacks) == 1
    err = capsys.readouterr().err
    assert err.startswith("warning: --") and "running with" in err
    record = resolved.record()
    assert record[f"{field}_used"] == ran and record["switch_fallbacks"] == list(resolved.fallbacks)


def test_forced_switch_the_device_cannot_do_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--dtype fp16: .* on cpu; choose from: fp32"):
        resolve(Switches(dtype="fp16"), CPU, strict=True)
    with pytest.raises(UsageError, match="--cuda-graphs on"):
        resolve(Switches(cuda_graphs=True), CPU, strict=True)


def test_forcing_one_switch_leaves_the_auto_ones_free_to_fall_back(capsys):
    """`--optimizer-impl foreach` alone must not turn the auto dtype's fallback (no native
    bf16, or the known-bad bf16 kernel of dey2018's 2-wide layers) into an error. The auto
    dtype is given bf16 (a tuned choice): on a CPU without native bf16 the table would give
    fp32 and nothing would fall back."""
    model = create_model("dualpath3d", preset="dey2018", filters=2)
    inputs = [torch.rand(2, 1, 5, 50, 50), torch.rand(2, 1, 5, 50, 50)]
    requested = replace(auto_switches(), optimizer="foreach")
    fast = replace(fast_defaults(CPU), dtype="bf16")
    resolved = resolve(requested, CPU, strict=True, probe=(model, inputs), fast=fast)
    assert resolved.switches.optimizer == "foreach" and resolved.switches.dtype == "fp32"
    assert len(resolved.fallbacks) == 1 and "--dtype bf16" in resolved.fallbacks[0]
    # Forced by name: only that switch is strict.
    fp16_and_foreach = Switches(dtype="fp16", optimizer="foreach")
    assert resolve(fp16_and_foreach, CPU, strict=("optimizer",)).switches.dtype == "fp32"
    with pytest.raises(UsageError, match="--dtype fp16"):
        resolve(fp16_and_foreach, CPU, strict=("dtype",))
    capsys.readouterr()


def test_cuda_only_switches_are_not_forced_in_a_cpu_and_cuda_sweep():
    from lungbench.commands._speed import forced_switches

    given = {"tf32": True, "dtype": "fp16", "optimizer": "foreach"}
    assert forced_switches(given, ["cuda"]) == ("tf32", "dtype", "optimizer")
    assert forced_switches(given, ["cpu", "cuda:0"]) == ("optimizer",)
    assert forced_switches({"dtype": "bf16"}, ["cpu", "cuda"]) == ("dtype",)


def test_unknown_value_names_the_option_and_choices():
    with pytest.raises(UsageError, match=r"--dtype 'fp8'.*choose from: fp32, bf16, fp16, auto"):
        resolve(Switches(dtype="fp8"), CPU)


def test_auto_resolves_to_the_fast_defaults_and_eager_stays_plain(capsys):
    resolved = resolve(auto_switches(), CPU)
    assert resolved.switches == fast_defaults(CPU) and resolved.fallbacks == ()
    assert resolved.switches.compile == "off"  # compiling costs minutes: never by default
    assert resolve(eager_fp32(), CPU).switches == eager_fp32()
    assert capsys.readouterr().err == ""


def test_channels_last_follows_the_input_rank():
    assert (
        resolve(Switches(memory_format="channels_last"), CPU).switches.memory_format
        == "channels_last_3d"
    )
    assert (
        resolve(
            Switches(memory_format="channels_last_3d"), CPU, input_ndim=4
        ).switches.memory_format
        == "channels_last"
    )


def test_known_bad_cpu_bf16_layer_shape_falls_back():
    from lungbench.switches import cpu_bf16_unsafe

    model = DualPath3D(filters=2, depth=2, context_grid=(5, 8, 8), zoom_grid=(5, 8, 8))
    inputs = [torch.rand(2, 1, 5, 8, 8)] * 2
    assert cpu_bf16_unsafe(model, inputs) == "Conv3d on input (2, 2, 4, 4)"
    assert cpu_bf16_unsafe(tiny_model(), [torch.rand(2, 1, *GRID)] * 2) is None
    if bf16_supported(CPU):
        resolved = resolve(Switches(dtype="bf16"), CPU, probe=(model, inputs), warn=print)
        assert resolved.switches.dtype == "fp32" and "garbage" in resolved.fallbacks[0]


def test_backend_flags_are_restored():
    before = torch.backends.cudnn.benchmark
    with backend_flags(Switches(cudnn_benchmark=True)):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before


@pytest.mark.slow
@pytest.mark.skipif(compiler_available(CPU) is not None, reason="no C++ compiler for inductor")
def test_compiled_step_matches_fp32(fp32_loss):
    switches = Switches(memory_format="channels_last_3d", compile="default")
    assert abs(loss_after_steps(switches) - fp32_loss) <= tolerance(switches)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "switches",
    [
        Switches(dtype="fp16"),
        Switches(cuda_graphs=True),
        Switches(tf32=True, cudnn_benchmark=True, optimizer="fused"),
    ],
)
def test_cuda_switches_match_fp32(switches):
    cuda = torch.device("cuda")

    def run(sw: Switches) -> float:
        model = tiny_model().to(cuda).train()
        step = TrainStep(model, bce_loss, resolve(sw, cuda).switches, cuda)
        data = [([x.to(cuda) for x in xs], y.to(cuda)) for xs, y in batches()]
        with backend_flags(step.switches):
            for inputs, target in data:
                step(NO_TIMER, step.prepare_inputs(inputs), target)
        with torch.no_grad():
            return float(bce_loss(model(*data[-1][0]), data[-1][1]))

    assert abs(run(switches) - run(eager_fp32())) <= tolerance(switches)


def test_a_compiled_step_keeps_its_generated_code_in_lungbench_cache(tmp_path, monkeypatch):
    """The compile is paid once per host and workload: inductor's caches live under
    $LUNGBENCH_CACHE_DIR/inductor (compiling itself is lazy: nothing compiles here)."""
    import os

    from lungbench.step import compiled

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    compiled(torch.nn.Linear(2, 1), "default")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiled(torch.nn.Linear(2, 1), "default")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine"), "the user's wins"
    # inductor writes its own default into the variable when anything asks for its folder
    # (FlopCounterMode does): that default is no user's choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    compiled(torch.nn.Linear(2, 1), "default")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
