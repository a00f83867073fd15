"""Layer 7 (harness): the run modes of `lungbench bench` and `lungbench profile`, built from
the primitives of lungbench.measure: the sweep of configurations and its resumable state
(sweep, sweep_state, sweep_file), DDP scaling (ddp), the switch ablation (ablation), the
tuning pass (tuning), the batch-size finder (batch_finder), the loader benchmark (loader) and
the profiled step (profiler).

What may live here: code that runs the one training step (lungbench.step) under a measuring
protocol and returns records. What may not: instruments (lungbench.measure), forecasts
(lungbench.predict), tables and plots (lungbench.report), or a `lungbench` subprocess (only
lungbench.commands may start one).
"""
