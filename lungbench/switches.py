"""Layer 5 (switches): the speed switches of a training step, what each device can do, and how to apply them.

A `Switches` value says how the step runs: memory format, autocast dtype, TF32, torch.compile,
cudnn.benchmark, the optimizer's implementation, CUDA graphs and the DDP gradient-bucket size.
`resolve()` turns a request into what this device will actually run: "auto" (or None for the
on/off switches) becomes the device's fast default, and a switch the device cannot do falls
back with a printed warning (or raises UsageError when `strict`, i.e. the user forced it).
Every result record carries the request (fields `dtype`, ...) and `Resolved.record()`: what
ran (`dtype_used`, ...) and why it differs (`switch_fallbacks`).

"auto" is chosen by measurement where the run happens: `lungbench bench` and `profile` run a
short tuning pass per workload and device (lungbench.harness.tuning) and pass its choice as
`fast`; under a launcher each rank runs the choice cached for one rank's workload on rank 0's
host (lungbench.harness.ddp.agreed_tuning). The table below (`fast_defaults`) is only the
fallback when no pass ran (--no-tune, or no cached choice under a launcher); it was measured on one machine and can be slower elsewhere (an Intel Xeon
with AVX512-BF16 but no AMX ran bf16 autocast at 0.89x of eager FP32):

    cpu   contiguous, bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX; else
          fp32), foreach Adam, compile off. Measured on the 2-core AMD EPYC (AVX512-BF16) dev
          box, dualpath3d f16 batch 2 default grid, 20 interleaved rounds on a quiet machine:
          eager FP32 contiguous 30.7 ms/step (46% of the FP32 matmul peak); channels_last_3d
          0.97x (then: the first convolution left it contiguous; viewed channels-last since,
          it measured 1.36x and the tuning pass picks it: docs/performance.md); foreach Adam
          1.0x; bf16 1.15-1.2x; torch.compile + bf16 1.28-1.30x. Compile stays off by
          default: its first step costs 1-2.5 minutes on 2 cores, more than a default sweep;
          ask for it with `--compile default`.
    cuda  channels_last_3d, bf16 autocast where supported (else fp32), TF32 on, cudnn.benchmark
          on (fixed shapes), fused Adam, compile off (same reason), CUDA graphs off (opt-in).
          These follow the PyTorch performance tuning guide; not yet measured by lungbench on a
          GPU (no device was lent when they were chosen).

    sw = resolve(Switches(dtype="bf16"), torch.device("cpu"))      # -> Resolved
    step = TrainStep(model, loss_fn, sw.switches, device)            # applies format / compile
    inputs = step.prepare_inputs(inputs)
    with backend_flags(sw.switches):
        loss = step(timer, inputs, target)

`eager_fp32()` is the plain baseline: contiguous, FP32, no compile, torch's default optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import shutil
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from lungbench.core.errors import UsageError, look_up_option
from lungbench.core.options import ON_OFF, option, positive_int, spec_of

_log = logging.getLogger(__name__)  # fallback warnings (the CLI shows them on stderr)

AUTO = "auto"


MEMORY_FORMATS = ("contiguous", "channels_last", "channels_last_3d")


DTYPES = ("fp32", "bf16", "fp16")


COMPILE_MODES = ("off", "default", "max-autotune")


OPTIMIZER_IMPLS = ("default", "foreach", "fused")


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Switches:
    """How a training step runs. "auto" / None mean: the device's fast default."""

    memory_format: str = "contiguous"  # contiguous | channels_last | channels_last_3d | auto
    dtype: str = "fp32"  # autocast dtype: fp32 (off) | bf16 | fp16 (with GradScaler) | auto
    tf32: bool | None = False  # CUDA: TF32 matmul and convolution
    compile: str = "off"  # torch.compile mode: off | default | max-autotune | auto
    cudnn_benchmark: bool | None = False  # CUDA: autotune convolution algorithms
    optimizer: str = "default"  # Adam implementation: default | foreach | fused | auto
    cuda_graphs: bool | None = False  # CUDA: capture the fixed-shape step in one graph
    ddp_bucket_mb: int = 25  # DDP gradient bucket (torch's default 25 MB); used by DDP runs

    def validate(self) -> Switches:
        """UsageError naming the option and its choices for any unknown value."""
        look_up_option(self.memory_format, (*MEMORY_FORMATS, AUTO), what="--memory-format")
        look_up_option(self.dtype, (*DTYPES, AUTO), what="--dtype")
        look_up_option(self.compile, (*COMPILE_MODES, AUTO), what="--compile")
        look_up_option(self.optimizer, (*OPTIMIZER_IMPLS, AUTO), what=switch_flag("optimizer"))
        if int(self.ddp_bucket_mb) < 1:
            raise UsageError(f"--ddp-bucket-mb must be >= 1, got {self.ddp_bucket_mb}")
        return self

    def is_fp32_math(self) -> bool:
        """True when the arithmetic stays FP32 (no autocast, no TF32)."""
        return self.dtype == "fp32" and not self.tf32


def eager_fp32() -> Switches:
    """The plain baseline every speed-up is measured against."""
    return Switches()


def auto_switches() -> Switches:
    """Every switch on "auto": the device's fast default (what `lungbench bench` uses)."""
    return Switches(
        memory_format=AUTO,
        dtype=AUTO,
        tf32=None,
        compile=AUTO,
        cudnn_benchmark=None,
        optimizer=AUTO,
        cuda_graphs=None,
    )


# The --help section of SwitchRequest's options.
SWITCH_OPTIONS = (
    "speed switches (default 'auto': the device's measured fast choice; a value given here is "
    "forced: a device that cannot do it is an error; see docs/performance.md)"
)


@dataclass(frozen=True)
class SwitchRequest:
    """The speed switches as a user asks for them: the options of `lungbench bench` and
    `lungbench profile` (declared with lungbench.core.options), every one "auto" (or None)
    unless given. Flat fields, so that a request inheriting them (BenchRequest) saves them
    flat in config.json; `switches_of(request)` gives the Switches.

    "auto" takes the fast choice that a short tuning pass per workload measures where the
    run happens (lungbench.harness.tuning; `tune`, `retune`, `tune_compile`), or the table
    `fast_defaults` with tune=False. strict_switches: the switches the user forced (no
    fallback: a device that cannot do one is an error).
    """

    dtype: str = option(
        AUTO,
        choices=(AUTO, *DTYPES),
        group=SWITCH_OPTIONS,
        help="autocast dtype; fp16 uses a grad scaler (CUDA only)",
    )
    memory_format: str = option(
        AUTO,
        choices=(AUTO, *MEMORY_FORMATS),
        group=SWITCH_OPTIONS,
        help="tensor layout; channels_last* follow the input rank",
    )
    compile: str = option(
        AUTO,
        choices=(AUTO, *COMPILE_MODES),
        group=SWITCH_OPTIONS,
        help="torch.compile mode (auto: off; the first compiled step costs minutes on a small CPU)",
    )
    tf32: bool | None = option(
        None,
        action=ON_OFF,
        group=SWITCH_OPTIONS,
        default_text="auto = on for CUDA",
        help="CUDA TF32 matmul/conv",
    )
    cudnn_benchmark: bool | None = option(
        None,
        action=ON_OFF,
        group=SWITCH_OPTIONS,
        default_text="auto = on for CUDA",
        help="cuDNN autotuning",
    )
    optimizer: str = option(
        AUTO,
        flag="--optimizer-impl",
        choices=(AUTO, *OPTIMIZER_IMPLS),
        group=SWITCH_OPTIONS,
        default_text="auto = foreach on CPU, fused on CUDA",
        help="Adam implementation",
    )
    cuda_graphs: bool | None = option(
        None,
        action=ON_OFF,
        group=SWITCH_OPTIONS,
        help="capture the fixed-shape step as one CUDA graph",
    )
    ddp_bucket_mb: int = option(
        25,
        type=positive_int,
        group=SWITCH_OPTIONS,
        help="DDP gradient bucket size in MB, under a launcher",
    )
    strict_switches: tuple[str, ...] = ()
    tune: bool = option(
        True,
        flag="--no-tune",
        group=SWITCH_OPTIONS,
        default_text="a short tuning pass per workload measures eager FP32 and each switch, "
        "interleaved, and picks the fastest that passes an accuracy check; cached per host, "
        "device, torch version and workload",
        help="'auto' takes the device's table instead of a measurement here",
    )
    retune: bool = option(  # measure again though the cache has a choice
        False,
        group=SWITCH_OPTIONS,
        help="run the tuning pass again though its choice is cached",
    )
    tune_compile: bool = option(  # torch.compile among the candidates (minutes on a CPU)
        False,
        group=SWITCH_OPTIONS,
        help="let the tuning pass try torch.compile (its first step costs minutes on a CPU)",
    )


def fast_defaults(device: torch.device) -> Switches:
    """The measured fast choice for `device` (see the module docstring)."""
    if device.type == "cuda":
        dtype = "bf16" if bf16_supported(device) else "fp32"
        return Switches(
            memory_format="channels_last_3d",
            dtype=dtype,
            tf32=True,
            compile="off",
            cudnn_benchmark=True,
            optimizer="fused",
            cuda_graphs=False,
        )
    # CPU: contiguous, because channels_last_3d measured 0.97x on the dev box (before the
    # first convolution kept it: then bf16 + foreach + channels_last_3d ran 1.20x bf16 +
    # foreach there, f16 b2 at 2 threads, which the tuning pass finds where it holds; this
    # fallback is not changed on one machine's word); bf16 measured 1.15-1.2x where the CPU
    # has native bf16 (module docstring).
    dtype = "bf16" if bf16_supported(device) else "fp32"
    return Switches(
        memory_format="contiguous",
        dtype=dtype,
        tf32=False,
        compile="off",
        cudnn_benchmark=False,
        optimizer="foreach",
        cuda_graphs=False,
    )


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 arithmetic: CUDA's own check; on CPU oneDNN's (AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def adam_implementations(device: torch.device) -> tuple[str, ...]:
    """The Adam implementations worth timing on `device`: fused on CUDA; foreach, and fused
    where this torch has it for CPU tensors (on the dev box's CPU fused Adam took 0.29 ms a
    step where foreach took 1.03, for f16's 0.6 M parameters; another CPU may differ)."""
    if device.type == "cuda":
        return ("fused",)
    return ("foreach", "fused") if fused_adam_on_cpu() else ("foreach",)


@functools.cache
def fused_adam_on_cpu() -> bool:
    """Whether this torch has a fused Adam for CPU tensors (torch 2.4 and later)."""
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def compiler_available(device: torch.device) -> str | None:
    """None when torch.compile can generate code for `device`, else the reason it cannot."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++ / c++ / clang++) on PATH"
    return None


def switch_flag(name: str) -> str:
    """The `lungbench bench` option of a Switches field (messages name what users type)."""
    spec = next((spec_of(f) for f in fields(SwitchRequest) if f.name == name), None)
    return spec.flag_of(name) if spec is not None else "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Resolved:
    """The switches that will run on a device, what was asked, and why they differ."""

    switches: Switches
    requested: Switches
    fallbacks: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """Flat fields for a result record: NAME_used is what ran (as `threads_used`; the
        config's own NAME fields keep what was asked), and the fallback messages."""
        out: dict[str, Any] = {f"{k}_used": v for k, v in asdict(self.switches).items()}
        out["switch_fallbacks"] = list(self.fallbacks)
        return out


def resolve(
    requested: Switches,
    device: torch.device,
    input_ndim: int = 5,
    strict: bool | Collection[str] = False,
    warn: Callable[[str], None] | None = None,
    probe: tuple[nn.Module, Sequence[torch.Tensor]] | None = None,
    fast: Switches | None = None,
) -> Resolved:
    """What `requested` becomes on `device` for inputs of rank `input_ndim`.

    "auto"/None take `fast`, the measured fast choice for this workload on this device
    (lungbench.harness.tuning), or without one the device's table (fast_defaults). A switch
    the device cannot do falls back (to the plain setting) with a warning through `warn`
    (default: this module's logger, which the CLI shows on stderr), or raises
    UsageError when the user forced it: `strict` is True (every switch given a value, not
    "auto") or the names of the forced switches. A switch left on "auto" always falls back.
    With `probe` (a model and example inputs) the model's layer shapes are checked against
    known bad kernels (`cpu_bf16_unsafe`).
    """
    requested.validate()
    given = {f.name for f in fields(Switches) if getattr(requested, f.name) not in (AUTO, None)}
    forced = given if strict is True else given & set(strict or ())
    fast = fast or fast_defaults(device)
    chosen = replace(
        requested,
        **{
            f.name: getattr(fast, f.name)
            for f in fields(Switches)
            if getattr(requested, f.name) in (AUTO, None)
        },
    )
    notes: list[str] = []

    def fall_back(name: str, value: Any, reason: str) -> None:
        nonlocal chosen
        message = (
            f"{switch_flag(name)} {_show(getattr(chosen, name))}: {reason}; "
            f"running with {_show(value)}"
        )
        if name in forced:
            raise UsageError(
                f"{switch_flag(name)} {_show(getattr(chosen, name))}: "
                f"{reason} on {device.type}; choose from: "
                + ", ".join(_show(v) for v in _possible(name, device))
            )
        notes.append(message)
        (warn or _log.warning)(f"warning: {message}")
        chosen = replace(chosen, **{name: value})

    cuda = device.type == "cuda"
    chosen = replace(chosen, memory_format=_format_for_rank(chosen.memory_format, input_ndim))
    if chosen.dtype == "bf16" and not bf16_supported(device):
        fall_back("dtype", "fp32", f"{device.type} has no native bf16")
    if chosen.dtype == "fp16" and not cuda:
        fall_back("dtype", "fp32", "fp16 autocast with a grad scaler needs CUDA")
    if chosen.tf32 and not cuda:
        fall_back("tf32", False, "TF32 exists on CUDA only")
    if chosen.cudnn_benchmark and not cuda:
        fall_back("cudnn_benchmark", False, "cuDNN exists on CUDA only")
    if chosen.compile != "off":
        reason = compiler_available(device)
        if reason:
            fall_back("compile", "off", reason)
    if chosen.cuda_graphs and not cuda:
        fall_back("cuda_graphs", False, "CUDA graphs exist on CUDA only")
    if chosen.cuda_graphs and chosen.dtype == "fp16":
        fall_back("cuda_graphs", False, "the fp16 grad scaler's inf checks break graph capture")
    if chosen.cuda_graphs and chosen.compile != "off":
        fall_back("cuda_graphs", False, "torch.compile manages its own graphs")
    if probe is not None and chosen.dtype == "bf16" and not cuda:
        bad = cpu_bf16_unsafe(*probe)
        if bad:
            fall_back(
                "dtype",
                "fp32",
                f"bf16 convolution backward on CPU returns garbage "
                f"weight gradients for {bad} (torch {torch.__version__}, oneDNN)",
            )
    return Resolved(chosen, requested, tuple(notes))


def cpu_bf16_unsafe(model: nn.Module, inputs: Sequence[torch.Tensor]) -> str | None:
    """The first convolution whose input has a spatial size of 2 under a 3-wide kernel.

    On this CPU's oneDNN (torch 2.13, AVX512-BF16) the bf16 Conv3d weight gradient of such
    a layer reads uninitialised memory (different every run, sometimes NaN); found by the
    ablation's accuracy check on the dey2018 preset (depth 5 -> 2 after one pooling). Sizes
    1 and >= 3 are fine. One forward at batch 1 collects the shapes.
    """
    found: list[str] = []

    def hook(module: nn.Module, args: tuple, _out: Any) -> None:
        spatial = args[0].shape[2:]
        kernel = module.kernel_size
        if not found and any(s == 2 and k >= 3 for s, k in zip(spatial, kernel, strict=False)):
            found.append(f"{type(module).__name__} on input {tuple(args[0].shape[1:])}")

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv3d, nn.Conv2d))
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*[x[:1] for x in inputs])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _format_for_rank(name: str, ndim: int) -> str:
    """channels_last / channels_last_3d follow the input's rank (4D / 5D); else contiguous."""
    if name == "contiguous":
        return name
    return {4: "channels_last", 5: "channels_last_3d"}.get(ndim, "contiguous")


def _possible(name: str, device: torch.device) -> Sequence[Any]:
    cuda = device.type == "cuda"
    if name == "dtype":
        return [
            d
            for d in DTYPES
            if d == "fp32" or (d == "bf16" and bf16_supported(device)) or (d == "fp16" and cuda)
        ]
    if name == "compile":
        return ["off"]
    return [False]


def _show(value: Any) -> str:
    return (
        {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)
    )


def torch_memory_format(name: str, ndim: int) -> torch.memory_format:
    """The torch memory format for a tensor of rank `ndim` (contiguous for other ranks)."""
    if name == "contiguous" or ndim not in (4, 5):
        return torch.contiguous_format
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def to_memory_format(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """`tensor` in memory format `name` (by its rank; other ranks are left as they are)."""
    if name == "contiguous" or tensor.dim() not in (4, 5):
        return tensor.contiguous() if name == "contiguous" else tensor
    return tensor.contiguous(memory_format=torch_memory_format(name, tensor.dim()))


def in_format(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A model input or parameter in memory format `name`. A one-channel tensor has the same
    bytes in both layouts, and `contiguous(memory_format=...)` leaves it its contiguous
    strides. On an input, a convolution infers a contiguous output from them and every layer
    after it follows: with channels_last_3d the dual-path model's largest max-pool then stayed
    contiguous (5.1 ms forward on the dev box where channels-last takes 0.47 ms) and the
    format lost (0.97x). On a one-input-channel weight, its gradient comes back with
    channels-last strides, which DDP compares with the bucket view it built from the weight:
    it copies the gradient every step and warns. Such a tensor is viewed with channels-last
    strides instead: no copy."""
    out = to_memory_format(tensor, name)
    if out.dim() not in (4, 5) or out.size(1) != 1:
        return out
    if not out.is_contiguous():  # not one plain block: no relabelling of its bytes
        return out
    sizes = out.shape
    spatial = [1]
    for size in reversed(sizes[2:]):  # W, H(, D): each stride the product of those after it
        spatial.insert(0, spatial[0] * size)
    # contiguous: back to the plain strides (a tensor viewed channels-last before keeps them)
    strides = (spatial[0], *spatial) if name == "contiguous" else (spatial[0], 1, *spatial[1:])
    return out if out.stride() == strides else out.as_strided(sizes, strides)


def apply_memory_format(model: nn.Module, name: str) -> nn.Module:
    """Convert 4D/5D parameters and buffers in place (each by its own rank; a one-channel
    weight viewed, not copied: in_format), and view the input of every convolution fed one
    channel in that format (`_view_one_channel_inputs`).

    `Module.to(memory_format=...)` would raise on a 4D weight in a 5D model (or the other
    way round), so each tensor gets the format of its own rank.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = in_format(tensor.data, name)
    _view_one_channel_inputs(model, name)
    return model


_FORMAT_HOOK = "_lungbench_input_format"  # the module attribute holding its hook's handle


def _view_one_channel_inputs(model: nn.Module, name: str) -> None:
    """A forward pre-hook on every convolution fed one channel views its input in format
    `name` (in_format), so that every caller, not only TrainStep.prepare_inputs
    (evaluation, a user's own loop), gets the layout asked for. Applying another format
    replaces the hook; contiguous removes it."""
    for module in model.modules():
        handle = getattr(module, _FORMAT_HOOK, None)
        if handle is not None:
            handle.remove()
            delattr(module, _FORMAT_HOOK)
        if name == "contiguous" or not isinstance(module, (nn.Conv2d, nn.Conv3d)):
            continue
        if module.in_channels == 1:
            hook = functools.partial(_input_viewed, name=name)
            setattr(module, _FORMAT_HOOK, module.register_forward_pre_hook(hook))


def _input_viewed(module: nn.Module, args: tuple, name: str) -> tuple:
    return (in_format(args[0], name), *args[1:])


class _MaxPoolInInputDtype:
    """A max-pool that runs in its input's dtype under autocast.

    CPU autocast lists max_pool3d among the ops it runs in FP32: each pool casts its bf16
    input up (the whole activation) and the next convolution casts the pool's output back,
    and the backward pass does the same for the gradients. A max selects one of its inputs,
    so pooling bf16 values in bf16 gives the same values as pooling them in FP32 (and the
    gradient, which a non-overlapping pool only routes, the same too); only the casts and
    half the pool's memory traffic go. On the dev box the largest pool's forward and
    backward took 0.96 ms in bf16 against 1.93 ms with the casts (f16 b2, channels-last)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input)  # type: ignore[misc]


class MaxPool1dInInputDtype(_MaxPoolInInputDtype, nn.MaxPool1d):
    pass


class MaxPool2dInInputDtype(_MaxPoolInInputDtype, nn.MaxPool2d):
    pass


class MaxPool3dInInputDtype(_MaxPoolInInputDtype, nn.MaxPool3d):
    pass


_IN_INPUT_DTYPE = {
    nn.MaxPool1d: MaxPool1dInInputDtype,
    nn.MaxPool2d: MaxPool2dInInputDtype,
    nn.MaxPool3d: MaxPool3dInInputDtype,
}


def pools_in_input_dtype(model: nn.Module, autocast_on: bool) -> nn.Module:
    """With autocast on, every max-pool of `model` runs in its input's dtype
    (_MaxPoolInInputDtype); off, each is a plain max-pool again. The module's class is
    swapped for a subclass with the same state (a max-pool has none), so the model saves,
    copies and compiles as before."""
    plain = {v: k for k, v in _IN_INPUT_DTYPE.items()}
    for module in model.modules():
        kind = type(module)
        if autocast_on and kind in _IN_INPUT_DTYPE:
            module.__class__ = _IN_INPUT_DTYPE[kind]
        elif not autocast_on and kind in plain:
            module.__class__ = plain[kind]
    return model


@contextlib.contextmanager
def backend_flags(switches: Switches) -> Iterator[None]:
    """Set the process-wide flags (TF32, cudnn.benchmark) for a block; restore them after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = bool(switches.tf32)
        torch.backends.cudnn.allow_tf32 = bool(switches.tf32)
        torch.backends.cudnn.benchmark = bool(switches.cudnn_benchmark)
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = saved


def autocast(switches: Switches, device: torch.device, cache: bool = True):
    """The autocast context of the switches (a disabled one for fp32)."""
    return torch.autocast(
        device.type,
        dtype=TORCH_DTYPES[switches.dtype],
        enabled=switches.dtype != "fp32",
        cache_enabled=cache,
    )


def has_auto(switches: Switches) -> bool:
    """True when some switch is left to the device ("auto" / None)."""
    return any(getattr(switches, f.name) in (AUTO, None) for f in fields(Switches))


def switch_fields() -> tuple[str, ...]:
    """Names of the switch fields (BenchConfig carries the same names)."""
    return tuple(f.name for f in fields(Switches))


def switches_of(config: Any) -> Switches:
    """The Switches a config holds (its `switches` field), or built from its fields of the
    same names (a request that carries them flat, e.g. BenchRequest)."""
    if isinstance(getattr(config, "switches", None), Switches):
        return config.switches
    return Switches(
        **{name: getattr(config, name) for name in switch_fields() if hasattr(config, name)}
    )


def resolve_switches(
    config: Any,
    device: torch.device,
    input_ndim: int = 5,
    quiet: bool = False,
    probe: tuple[nn.Module, Sequence[torch.Tensor]] | None = None,
) -> Resolved:
    """`resolve()` for a config carrying the switch fields (and `strict_switches`)."""
    return resolve(
        switches_of(config),
        device,
        input_ndim,
        strict=getattr(config, "strict_switches", False),
        warn=(lambda message: None) if quiet else None,
        probe=probe,
        fast=getattr(config, "fast", None),
    )


# Switches that exist on CUDA only: forced in a sweep over CPU and CUDA devices, they apply
# to the CUDA rows and fall back with a warning on the CPU rows (the thesis's CPU vs GPU table).
CUDA_ONLY_SWITCHES = ("tf32", "cudnn_benchmark", "cuda_graphs")


def check_switches(request: Any, devices: Sequence[str]) -> None:
    """UsageError, before anything runs, when forced switches cannot run on a device."""
    from lungbench.core.device import parse_device

    switches = switches_of(request).validate()
    strict = getattr(request, "strict_switches", False)
    if strict:
        for name in devices:
            resolve(switches, parse_device(name), strict=strict, warn=lambda _: None)
