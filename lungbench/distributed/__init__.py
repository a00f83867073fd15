"""Layer 2 (distributed): how the job was launched (torchrun, srun, mpiexec) and its process group."""
