"""Layer 6 (measure): measuring the one training step (lungbench.step): timing, statistics, the sweep, DDP, ablation, batch finder, loader benchmark, peaks, telemetry, profiler and trace analysis."""
