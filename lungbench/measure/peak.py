"""Layer 6 (measure): The device's measured peak: what a large matrix product reaches on this machine.

Every measurement's achieved FLOP/s is reported as a fraction of this number, measured on
the same device and dtype, not taken from a data sheet.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from lungbench.core.device import synchronize
from lungbench.core.errors import UsageError, look_up_option

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# fp16 matrix products on CPU have no fast kernels (a few GFLOP/s): no peak worth measuring.
CPU_DTYPES = ("fp32", "bf16")


# Default sizes, per device type: matrix side, and bytes copied (far beyond any cache).
MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}


COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}


def default_matmul_size(device: torch.device) -> int:
    return MATMUL_SIZE["cuda" if device.type == "cuda" else "cpu"]


def default_copy_bytes(device: torch.device) -> int:
    return COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]


def check_dtype(dtype: str, device: torch.device, option: str = "--dtype") -> str:
    """`dtype` if it can be measured on `device`, else UsageError naming the valid choices."""
    look_up_option(dtype, DTYPES, what=option)
    if device.type == "cpu" and dtype not in CPU_DTYPES:
        raise UsageError(
            f"{option} {dtype}: not measured on CPU (no fast kernels); "
            f"choose from: {', '.join(CPU_DTYPES)}"
        )
    return dtype


def matmul_peak_flops(
    device: torch.device, dtype: str = "fp32", size: int | None = None, repeats: int = 5
) -> float:
    """Best FLOP/s of `size` x `size` matrix products (2 n^3 FLOPs each) on `device`."""
    return matmul_peak_stats(device, dtype, size, repeats)[0]


def timed_runs(run: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `run`, after one untimed warm-up call, each between
    two synchronizations (the clock sees all of the device's work)."""
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        run()
        synchronize(device)  # note: CPU-GPU sync point
        if i:
            times.append(time.perf_counter() - t0)
    return times


def matmul_peak_stats(
    device: torch.device, dtype: str = "fp32", size: int | None = None, repeats: int = 5
) -> tuple[float, float]:
    """(best, median) FLOP/s of `repeats` matrix products: the best is the peak, and how far
    the median falls below it is the spread a busy or throttling machine shows."""
    if size is None:
        size = default_matmul_size(device)
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    b = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    times = timed_runs(lambda: torch.mm(a, b), device, repeats)
    flops = 2.0 * size**3
    return flops / min(times), flops / statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Best memory bandwidth in bytes/s of a large device-to-device copy.

    Each copy reads and writes `nbytes`, so it moves 2 x `nbytes`; the buffers are far larger
    than any cache (256 MiB on CPU, 1 GiB on GPU by default).
    """
    if nbytes is None:
        nbytes = default_copy_bytes(device)
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = min(timed_runs(lambda: dst.copy_(src), device, repeats))  # warm-up: page faults
    return 2.0 * src.numel() * 4 / best


# The convolution of conv_rate: a middle layer of the thesis's network at its default size.
CONV_SHAPE = {"batch": 2, "in_channels": 16, "out_channels": 32, "side": 16, "kernel": 3}


def conv_rate(device: torch.device, dtype: str, repeats: int = 7) -> float:
    """Best FLOP/s of one 3D convolution's forward and backward (CONV_SHAPE; the math in
    `dtype` by autocast, as the training step runs it). oneDNN's convolutions reach and
    parallelize differently from a large matrix product (the dev box, 1 -> 2 threads: the
    product gained 1.93x, this convolution 1.39x), so the per-operator model bounds
    convolutions by this rate rather than by the product's peak."""
    shape = CONV_SHAPE
    side = shape["side"]
    x = torch.randn(shape["batch"], shape["in_channels"], side, side, side, device=device)
    x.requires_grad_(True)
    conv = torch.nn.Conv3d(
        shape["in_channels"], shape["out_channels"], shape["kernel"], padding=1, bias=False
    ).to(device)
    multiply_adds = (
        shape["batch"]
        * shape["out_channels"]
        * side**3
        * shape["in_channels"]
        * shape["kernel"] ** 3
    )
    flops = 3 * 2 * multiply_adds  # forward, input gradient, weight gradient
    autocast = dtype in ("bf16", "fp16")

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=autocast):
            y = conv(x)
        y.float().sum().backward()

    return flops / min(timed_runs(forward_backward, device, repeats))  # warm-up: oneDNN's kernels


def device_peaks(
    device: torch.device, dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
) -> dict[str, float]:
    """Matrix-product peak of `device` per dtype: FP32 always; bf16 where the device has
    native bf16 arithmetic; fp16 on CUDA only (CPU has no fast fp16 kernels)."""
    from lungbench.switches import bf16_supported

    wanted = ["fp32"]
    if "bf16" in dtypes and bf16_supported(device):
        wanted.append("bf16")
    if "fp16" in dtypes and device.type == "cuda":
        wanted.append("fp16")
    peaks: dict[str, float] = {}
    for dtype in wanted:
        best, median = matmul_peak_stats(device, dtype)
        peaks[dtype] = best
        peaks[f"{dtype}_spread"] = 1.0 - median / best  # 0 on a quiet, steady machine
    peaks["copy_bytes_per_s"] = copy_bandwidth(device)
    return peaks


def attach_peak(record: dict, peaks: dict[str, float] | None) -> None:
    """Set a record's `peak_flops`, `peak_dtype` and `peak_fraction`: its achieved FLOP/s
    against the peak of the dtype its math ran in (FP32, or the autocast dtype), never above
    1: a step faster than the measured peak means the peak was measured low (a busy
    machine); the record is then flagged (`peak_exceeded`) and its fraction capped. With the
    copy bandwidth and the step's bytes moved, also its roofline bound: the larger of the
    compute time (FLOPs / peak) and the memory time (bytes / bandwidth), and how far the
    step is from it."""
    dtype = record.get("dtype_used") or "fp32"
    peaks = peaks or {}
    peak = peaks.get(dtype)
    if record.get("achieved_flops") and peak:
        record["peak_flops"], record["peak_dtype"] = peak, dtype
        fraction = record["achieved_flops"] / peak
        record["peak_exceeded"] = fraction > 1.0
        record["peak_fraction"] = min(fraction, 1.0)
    bandwidth = peaks.get("copy_bytes_per_s")
    step = record.get("step_s_median")
    if peak and bandwidth and step and record.get("bytes_per_step"):
        compute_s = record["flops_per_step"] / peak
        memory_s = record["bytes_per_step"] / bandwidth
        record["roofline_bound"] = "compute" if compute_s >= memory_s else "memory"
        record["roofline_s"] = max(compute_s, memory_s)
        record["roofline_fraction"] = min(max(compute_s, memory_s) / step, 1.0)


def peak_record(
    device: torch.device, dtype: str = "fp32", size: int | None = None, nbytes: int | None = None
) -> dict:
    """What `lungbench env --peak` stores: the matrix-product peak in `dtype` and the copy
    bandwidth on `device`, with the sizes used (the same function as every peak_fraction)."""
    size = default_matmul_size(device) if size is None else size
    nbytes = default_copy_bytes(device) if nbytes is None else nbytes
    return {
        "device": str(device),
        "dtype": dtype,
        "matmul_size": size,
        "matmul_flops": matmul_peak_flops(device, dtype, size=size),
        "copy_bytes": nbytes,
        "copy_bytes_per_s": copy_bandwidth(device, nbytes),
        "torch_threads": torch.get_num_threads(),
    }
