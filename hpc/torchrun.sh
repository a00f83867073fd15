#!/bin/bash
# torchrun launch. One node, N processes (the thesis's table: CPU row, 1-GPU row measured by
# rank 0 alone, and the N-GPU DDP row, in one run):
#     torchrun --standalone --nproc_per_node 4 -m lungbench bench --device cpu cuda \
#         --filters 8 16 --batch 2 --dist-timeout 3600
# CPU only, 2 processes (Gloo):
#     torchrun --standalone --nproc_per_node 2 -m lungbench bench --preset dey2018
# Several nodes inside a SLURM allocation: one torchrun per node, c10d rendezvous on the
# first node (this script does that when NNODES > 1):
#     NNODES=2 NPROC=4 srun --ntasks-per-node=1 hpc/torchrun.sh --device cuda
set -euo pipefail
NPROC="${NPROC:-2}"
NNODES="${NNODES:-1}"
if [ "$NNODES" -eq 1 ]; then
    exec torchrun --standalone --nproc_per_node "$NPROC" -m lungbench bench "$@"
fi
head=$(python -c "from lungbench.distributed.group import parse_nodelist as p; import os; print(p(os.environ['SLURM_JOB_NODELIST'])[0])")
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv-backend c10d \
    --rdzv-endpoint "$head:${MASTER_PORT:-29500}" --rdzv-id "${SLURM_JOB_ID:-lungbench}" \
    -m lungbench bench "$@"
