# shellcheck shell=bash
# Cluster profile: a Marconi100-like machine (CINECA): IBM Power9 (ppc64le, 2 x 16 cores,
# SMT4 = 128 hardware threads) and 4 NVIDIA V100 16 GB per node, NVLink, InfiniBand EDR.
# Source it before sbatch, from the repository root (it exports LB_PROFILE, this file, which
# the job scripts source again on the compute node), and ask for a quarter node per rank:
#     source hpc/profiles/marconi100.sh
#     sbatch --gpus-per-node=4 --ntasks-per-node=4 --cpus-per-task=32 hpc/slurm/one_node.sbatch
# (#SBATCH lines cannot read variables; --gres=gpu:4 where --gpus-per-node is not known.)
# There are no PyPI wheels of torch for ppc64le: use the site's AI module (cineca-ai, an
# Open-CE / WML-CE conda stack with torch, NCCL and mpi4py) and install lungbench on top of it
# in a venv with --system-site-packages (see hpc/README.md).

if [ -n "${BASH_SOURCE[0]:-}" ]; then                        # this file, for the job scripts
    LB_PROFILE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
    export LB_PROFILE
fi

export SBATCH_PARTITION="${SBATCH_PARTITION:-m100_usr_prod}"
export SBATCH_QOS="${SBATCH_QOS:-normal}"                    # m100_qos_dbg: <= 2 nodes, 30 min
# export SBATCH_ACCOUNT="IscrC_myproj"                       # EDIT: your CINECA budget

module load profile/deeplrn
module load autoload cineca-ai                               # torch + cuda + nccl + spectrum_mpi
LB_VENV="${LB_VENV:-$HOME/lungbench/.venv}"
# shellcheck source=/dev/null  # the venv's activate script
if [ -f "$LB_VENV/bin/activate" ]; then . "$LB_VENV/bin/activate"; fi

# Inside a job: one thread per physical core of the rank's share (--cpus-per-task counts
# SMT4 hardware threads: 32 = 8 cores).
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK >= 4 ? SLURM_CPUS_PER_TASK / 4 : 1 ))
fi
export LB_OUT="${LB_OUT:-$CINECA_SCRATCH/lungbench-results}"
export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
