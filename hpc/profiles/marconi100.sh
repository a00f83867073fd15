# Cluster profile: a Marconi100-like machine (CINECA): IBM Power9 (ppc64le, 2 x 16 cores,
# SMT4 = 128 hardware threads) and 4 NVIDIA V100 16 GB per node, NVLink, InfiniBand EDR.
#     source hpc/profiles/marconi100.sh && sbatch hpc/slurm/one_node.sbatch
# There are no PyPI wheels of torch for ppc64le: use the site's AI module (cineca-ai, an
# Open-CE / WML-CE conda stack with torch, NCCL and mpi4py) and install lungbench on top of it
# in a venv with --system-site-packages (see hpc/README.md).

export SBATCH_PARTITION="${SBATCH_PARTITION:-m100_usr_prod}"
export SBATCH_QOS="${SBATCH_QOS:-normal}"                    # m100_qos_dbg: <= 2 nodes, 30 min
# export SBATCH_ACCOUNT="IscrC_myproj"                       # EDIT: your CINECA budget
export LB_GPUS_PER_NODE=4
export LB_CPUS_PER_GPU=32                                    # 128 hardware threads / 4 GPUs

module load profile/deeplrn
module load autoload cineca-ai                               # torch + cuda + nccl + spectrum_mpi
LB_VENV="${LB_VENV:-$HOME/lungbench/.venv}"
[ -f "$LB_VENV/bin/activate" ] && . "$LB_VENV/bin/activate"

export OMP_NUM_THREADS=8                                     # one thread per physical core and rank
export LB_OUT="${LB_OUT:-$CINECA_SCRATCH/lungbench-results}"
export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
