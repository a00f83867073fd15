#!/bin/bash
# MPI launch: mpiexec / mpirun starts the ranks; lungbench reads rank, size and the
# node-local rank through mpi4py and broadcasts rank 0's address and a free port.
# Works with MPICH (pip install 'lungbench[mpi]' brings the mpich wheel), Open MPI, Intel MPI
# and Spectrum MPI (Marconi100). One rank per GPU, or per CPU socket for CPU runs.
#     NP=4 hpc/mpiexec.sh --device cuda --filters 8 16 --batch 2
#     NP=2 hpc/mpiexec.sh --device cpu --preset dey2018 --scaling weak
# Across nodes: add your MPI's host option, e.g. MPI_HOSTS="-hosts n1,n2" (MPICH) or
# MPI_HOSTS="--hostfile hosts.txt" (Open MPI); set MASTER_ADDR to rank 0's fast interface.
set -euo pipefail
NP="${NP:-2}"
# shellcheck disable=SC2086  # MPI_HOSTS is a word list
exec mpiexec -n "$NP" ${MPI_HOSTS:-} env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
    python -m lungbench bench "$@"
