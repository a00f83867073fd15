"""The device's measured peak: what a large matrix product reaches on this machine.

Every measurement's achieved FLOP/s is reported as a fraction of this number, measured on
the same device and dtype, not taken from a data sheet.
"""

from __future__ import annotations

import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_peak_flops(
    device: torch.device, dtype: str = "fp32", size: int | None = None, repeats: int = 5
) -> float:
    """Best FLOP/s of `size` x `size` matrix products (2 n^3 FLOPs each) on `device`."""
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    b = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)  # note: CPU-GPU sync point, so the clock sees the whole product
        if i:  # the first product is a warm-up
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Best memory bandwidth in bytes/s of a large device-to-device copy.

    Each copy reads and writes `nbytes`, so it moves 2 x `nbytes`; the buffers are far larger
    than any cache (256 MiB on CPU, 1 GiB on GPU by default).
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)  # note: CPU-GPU sync point
        if i:  # the first copy is a warm-up (page faults on fresh CPU memory)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * src.numel() * 4 / best


def peak_record(
    device: torch.device, dtype: str = "fp32", size: int | None = None, nbytes: int | None = None
) -> dict:
    """What `lungbench env --peak` stores: the matrix-product peak in `dtype` and the copy
    bandwidth on `device`, with the sizes used (the same function as every peak_fraction)."""
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    return {
        "device": str(device),
        "dtype": dtype,
        "matmul_size": size,
        "matmul_flops": matmul_peak_flops(device, dtype, size=size),
        "copy_bytes": nbytes,
        "copy_bytes_per_s": copy_bandwidth(device, nbytes),
        "torch_threads": torch.get_num_threads(),
    }
