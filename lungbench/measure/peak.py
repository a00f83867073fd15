"""Layer 6 (measure): The device's measured peak: what a large matrix product reaches on this machine.

Every measurement's achieved FLOP/s is reported as a fraction of this number, measured on
the same device and dtype, not taken from a data sheet.
"""

from __future__ import annotations

import time

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
    if size is None:
        size = default_matmul_size(device)
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    b = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    best = float("inf")
    for i in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)  # note: CPU-GPU sync point, so the clock sees the whole product
        if i:  # the first product is a warm-up
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Best memory bandwidth in bytes/s of a large device-to-device copy.

    Each copy reads and writes `nbytes`, so it moves 2 x `nbytes`; the buffers are far larger
    than any cache (256 MiB on CPU, 1 GiB on GPU by default).
    """
    if nbytes is None:
        nbytes = default_copy_bytes(device)
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)  # note: CPU-GPU sync point
        if i:  # the first copy is a warm-up (page faults on fresh CPU memory)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * src.numel() * 4 / best


def device_peaks(
    device: torch.device, dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
) -> dict[str, float]:
    """Matrix-product peak of `device` per dtype: FP32 always; bf16 where the device has
    native bf16 arithmetic; fp16 on CUDA only (CPU has no fast fp16 kernels)."""
    from lungbench.step import bf16_supported

    peaks = {"fp32": matmul_peak_flops(device, "fp32")}
    if "bf16" in dtypes and bf16_supported(device):
        peaks["bf16"] = matmul_peak_flops(device, "bf16")
    if "fp16" in dtypes and device.type == "cuda":
        peaks["fp16"] = matmul_peak_flops(device, "fp16")
    return peaks


def attach_peak(record: dict, peaks: dict[str, float] | None) -> None:
    """Set a record's `peak_flops`, `peak_dtype` and `peak_fraction`: its achieved FLOP/s
    against the peak of the dtype its math ran in (FP32, or the autocast dtype)."""
    dtype = record.get("dtype_used") or "fp32"
    peak = (peaks or {}).get(dtype)
    if record.get("achieved_flops") and peak:
        record["peak_flops"], record["peak_dtype"] = peak, dtype
        record["peak_fraction"] = record["achieved_flops"] / peak


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
