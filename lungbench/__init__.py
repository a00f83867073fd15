"""Layer 0 (root): lungbench: benchmarking and HPC profiling for deep learning on 3D lung CT.

Layer 0: the version string only. The layers, lowest first (an import may only point down;
tests/test_layers.py checks every import, function-local ones too, and every launch of a
`lungbench` subprocess, which only the commands may start):

    core -> distributed -> data -> models -> step -> measure -> harness -> predict
         -> train -> report -> experiments -> commands -> cli
"""

__version__ = "0.1.0"
