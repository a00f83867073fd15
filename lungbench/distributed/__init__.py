"""Layer 2 (distributed): how the job was launched (torchrun, srun, mpiexec) and its process group.

What may live here: launch detection, the process group's life and its collectives' set-up.
What may not: a training step, DDP-wrapped models (lungbench.step) or timing (measure).
"""
