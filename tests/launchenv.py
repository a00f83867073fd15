"""The environment for the multi-process tests' child processes (torchrun, mpiexec, fake
SLURM): this process's environment without any launcher variable, since CI may itself run
under SLURM or MPI, and one thread per process, so two ranks fit fairly on two cores."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAUNCH_PREFIXES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_",
    "MASTER_",
    "GROUP_",
    "TORCHELASTIC",
    "SLURM_",
    "PMI_",
    "PMIX_",
    "OMPI_",
    "MV2_",
    "MPI_",
    "HYDRA",
    "LUNGBENCH_LAUNCHER",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, one thread per process, the
    checkout importable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env
