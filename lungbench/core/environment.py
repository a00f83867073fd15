"""Layer 1 (core): The environment record: everything needed to interpret or reproduce a measurement.

Library versions, CPU model, cores and threads, GPU model, driver, CUDA/cuDNN, git commit,
host, SLURM job and UTC time. Saved as environment.json in every run folder and printed by
`lungbench env`. Facts that cannot be read (no GPU, no NVML, not a git checkout) are recorded
as null with a reason, never raised.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch

from lungbench import __version__
from lungbench.core.allocator import allocator_state
from lungbench.core.runs import utc_now

LIBRARIES = (
    "torch",
    "numpy",
    "pandas",
    "h5py",
    "monai",
    "scikit-learn",
    "nvidia-ml-py",
    "mpi4py",
    "pydicom",
    "nibabel",
    "pytest-benchmark",
)


SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_NODELIST",
    "SLURM_NTASKS",
    "SLURM_CLUSTER_NAME",
    "SLURM_ARRAY_TASK_ID",
)


def environment_record() -> dict[str, Any]:
    """A JSON-ready description of this machine, process and checkout."""
    return {
        "utc_time": utc_now(),
        "host": socket.gethostname(),
        "lungbench": __version__,
        "git": git_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "cpu": cpu_info(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "malloc": allocator_state(),
        "torch": torch_info(),
        "gpus": gpu_info(),
        "slurm": {k: os.environ[k] for k in SLURM_VARIABLES if k in os.environ} or None,
    }


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def allowed_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_info() -> dict[str, Any]:
    return {
        "model": cpu_model(),
        "machine": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "affinity_cores": allowed_cores() if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model", "cpu\t")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def torch_info() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "version": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "distributed": torch.distributed.is_available(),
        "nccl": bool(cuda and torch.distributed.is_nccl_available()),
    }


def gpu_info() -> list[dict[str, Any]]:
    """One entry per visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    driver = _nvml_driver_version()
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "index": i,
                "name": props.name,
                "memory_total_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "driver": driver,
            }
        )
    return gpus


def _nvml_driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # NVML missing or no driver: a recorded fact, not an error
        return None


def git_info() -> dict[str, Any] | None:
    """Commit and dirty flag of the lungbench checkout (None when installed from a wheel)."""
    root = Path(__file__).resolve().parents[2]  # lungbench/core/environment.py -> checkout
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty.strip())}


def provenance(env: dict[str, Any], environment_file: str = "environment.json") -> dict[str, Any]:
    """What every record carries of where it comes from: its run's environment record (the
    file), the git commit and lungbench version that measured it, and when (UTC)."""
    from lungbench import __version__

    git = env.get("git") or {}
    return {
        "environment_file": environment_file,
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "lungbench_version": __version__,
        "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe_device(device: torch.device) -> str:
    """A short platform label for tables: 'cpu (2 threads)', 'cuda:0 NVIDIA H100'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
