"""Layer 1 (core): how the C allocator treats the memory a CPU training step frees.

glibc's malloc serves blocks above its mmap threshold (128 KiB, rising to at most 32 MiB
as such blocks are freed) from fresh mappings, and returns freed memory at the top of its
heap to the kernel beyond 128 KiB. A CPU training step frees and allocates the same large
activations and gradients every step, so each step page-faults them in again. On the dev
VM (2-core AMD EPYC, default f8, 1 thread) that was 126 MiB of page faults a step at batch
16; keeping freed memory made the step 1.2x faster at batch 4, 1.4x at 16 and 2.1x at 32
(a VM's page faults are dear). PyTorch's CPU tuning guide gives the same advice (jemalloc
or tcmalloc, or these glibc settings).

`keep_freed_memory()` raises both thresholds to KEEP_BYTES through mallopt, in this process
only, before the step allocates anything large; every lungbench command does it when it
starts (lungbench.cli), each DDP rank included, unless LUNGBENCH_MALLOC=system asks for the
allocator as it comes. What was done is recorded in every run's environment.json.

    state = keep_freed_memory()     # "glibc: freed memory kept for reuse (trim ... 1 GiB, ...)"
    minor_page_faults()             # this process's so far (a step's: the difference)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

from lungbench.core.errors import UsageError

ENV = "LUNGBENCH_MALLOC"  # "system": leave the allocator as it comes
SETTINGS = ("keep", "system")  # keep: freed memory kept for reuse (the default)
KEEP_BYTES = 1 << 30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_CAP = 32 << 20  # the largest mmap threshold glibc before 2.35 accepts

_state = "unchanged: lungbench has not set it"


def keep_freed_memory(limit: int = KEEP_BYTES) -> str:
    """Ask glibc to keep freed blocks up to `limit` bytes for reuse (mallopt) and return
    what was done, in words (also `allocator_state()`). A C library that is not glibc, or
    LUNGBENCH_MALLOC=system, leaves the allocator as it comes, and the words say so."""
    global _state
    if os.environ.get(ENV, "").strip().lower() == "system":
        _state = f"system default ({ENV}=system)"
        return _state
    libc = _glibc()
    if libc is None:
        _state = "system default (not glibc)"
        return _state
    trim = libc.mallopt(M_TRIM_THRESHOLD, limit)
    mmap = libc.mallopt(M_MMAP_THRESHOLD, limit)
    mmap_limit = limit
    if not mmap:  # older glibc caps the mmap threshold at 32 MiB (HEAP_MAX_SIZE / 2)
        mmap_limit = MMAP_CAP
        mmap = libc.mallopt(M_MMAP_THRESHOLD, MMAP_CAP)
    if trim and mmap:
        _state = (
            f"glibc: freed memory kept for reuse (trim threshold {_size(limit)}, "
            f"mmap threshold {_size(mmap_limit)})"
        )
    else:
        _state = f"glibc: mallopt refused (trim {trim}, mmap {mmap}); partly system default"
    return _state


def check_setting() -> None:
    """UsageError naming LUNGBENCH_MALLOC and its choices when it is set to anything else."""
    value = os.environ.get(ENV, "").strip().lower()
    if value and value not in SETTINGS:
        raise UsageError(f"{ENV}={os.environ[ENV]!r}: choose from: keep (the default), system")


def allocator_state() -> str:
    """What keep_freed_memory did in this process (for environment.json)."""
    return _state


def minor_page_faults() -> int:
    """Minor page faults of this process so far: pages the kernel mapped in on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"
