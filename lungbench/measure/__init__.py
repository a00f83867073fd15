"""Layer 6 (measure): the measuring primitives, each one instrument and nothing that runs a
benchmark: timing and statistics (timing, stats), peaks and their cache (peak, peak_cache),
memory estimates (memory), contention (contention), telemetry (telemetry), trace analysis
(trace), data waits (data_wait), the all-reduce model (allreduce) and the workload and
its protocol, each field declared once with its command-line option (workload).

What may live here: code that measures or models one thing and returns numbers. What may not:
a run mode that strings measurements together into a benchmark (that is lungbench.harness),
forecasting (lungbench.predict), or anything that writes a run folder.
"""
