"""lungbench: benchmarking and HPC profiling for deep learning on 3D lung CT."""

__version__ = "0.1.0"
