"""Process-group set-up for torchrun, SLURM srun, mpiexec, or a single process.

`init_distributed()` returns a DistContext; every other module takes that object and never
reads launcher environment variables itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. A single process has world_size 1, rank 0."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"  # "nccl", "gloo" or "none" for a single process
    launcher: str = "none"  # "torchrun", "slurm", "mpi" or "none"
    nodes: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 prints and writes results."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def single_process(device: str | torch.device = "cpu") -> DistContext:
    """The context of a plain, launcher-free run on `device`."""
    return DistContext(device=torch.device(device))
