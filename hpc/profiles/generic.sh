# Cluster profile: a generic SLURM cluster with NVIDIA GPUs and a Python virtual environment.
# Source it before sbatch (it exports SBATCH_* defaults that sbatch reads) and the job scripts
# source it again on the compute node (modules + environment):
#     source hpc/profiles/generic.sh && sbatch hpc/slurm/one_node.sbatch
# Copy it to hpc/profiles/<yourcluster>.sh and edit the marked lines.

# --- submission defaults (read by sbatch; a #SBATCH line or a command-line option wins) -----
export SBATCH_PARTITION="${SBATCH_PARTITION:-gpu}"          # EDIT: your GPU partition
# export SBATCH_ACCOUNT="my_project"                         # EDIT: if your site needs one
export LB_GPUS_PER_NODE="${LB_GPUS_PER_NODE:-4}"             # GPUs (= ranks) per node
export LB_CPUS_PER_GPU="${LB_CPUS_PER_GPU:-8}"               # cores per rank (DataLoader + host)

# --- software on the compute node ---------------------------------------------------------
# module load cuda/12.4 python/3.11                          # EDIT: if your site uses modules
LB_VENV="${LB_VENV:-$HOME/lungbench/.venv}"                  # EDIT: pip install -e '.[dev]'
[ -f "$LB_VENV/bin/activate" ] && . "$LB_VENV/bin/activate"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$LB_CPUS_PER_GPU}"
export LB_OUT="${LB_OUT:-$HOME/lungbench-results}"           # shared file system: every node reads the data from here
# export NCCL_SOCKET_IFNAME=ib0                              # pin NCCL to the fast interface if it picks the wrong one
# export NCCL_DEBUG=WARN
