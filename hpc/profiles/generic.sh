# shellcheck shell=bash
# Cluster profile: a generic SLURM cluster with NVIDIA GPUs and a Python virtual environment.
# Source it before sbatch, from the repository root: it exports SBATCH_* defaults that sbatch
# reads and LB_PROFILE (this file), which the job scripts source again on the compute node
# (modules + environment):
#     source hpc/profiles/generic.sh && sbatch hpc/slurm/one_node.sbatch
# Copy it to hpc/profiles/<yourcluster>.sh and edit the marked lines.
#
# Resources (GPUs, tasks and cores per node) are not set here: the job scripts' #SBATCH lines
# hold defaults for 4 GPUs and 8 cores per rank, and #SBATCH lines cannot read variables.
# Give your nodes' sizes on the sbatch command line (it wins over #SBATCH lines), e.g.
#     sbatch --gpus-per-node=4 --ntasks-per-node=4 --cpus-per-task=8 hpc/slurm/one_node.sbatch
# (older Slurm: --gres=gpu:4 instead of --gpus-per-node=4).

if [ -n "${BASH_SOURCE[0]:-}" ]; then                        # this file, for the job scripts
    LB_PROFILE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
    export LB_PROFILE
fi

# --- submission defaults (read by sbatch; they override #SBATCH lines, the command line wins)
export SBATCH_PARTITION="${SBATCH_PARTITION:-gpu}"          # EDIT: your GPU partition
# export SBATCH_ACCOUNT="my_project"                         # EDIT: if your site needs one

# --- software on the compute node ---------------------------------------------------------
# module load cuda/12.4 python/3.11                          # EDIT: if your site uses modules
LB_VENV="${LB_VENV:-$HOME/lungbench/.venv}"                  # EDIT: pip install -e '.[dev]'
# shellcheck source=/dev/null  # the venv's activate script
if [ -f "$LB_VENV/bin/activate" ]; then . "$LB_VENV/bin/activate"; fi

# Inside a job: one intra-op thread per core given to each rank (--cpus-per-task).
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"; fi
export LB_OUT="${LB_OUT:-$HOME/lungbench-results}"           # shared file system: every node reads the data from here
# export NCCL_SOCKET_IFNAME=ib0                              # pin NCCL to the fast interface if it picks the wrong one
# export NCCL_DEBUG=WARN
