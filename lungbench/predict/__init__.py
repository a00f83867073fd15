"""Layer 8 (predict): `lungbench predict`'s model: step and epoch time on other batch sizes, filters,
thread counts, ranks and devices, projected from one measured run, with its error measured.

    operators.py  each operator call of the step: FLOPs, bytes, dtype, phase, measured time
    model.py      per-operator scaling: measured time x (target bound / source bound)
    kernels.py    convolution calls made again alone: target/source time ratio on this CPU
    comm.py       ring all-reduce of DDP's buckets, alpha-beta fitted from Gloo all-reduces
    ddp_probe.py  what a CPU DDP step loses beyond its all-reduce (a tiny model, torchrun;
                  the fallback when rank_share cannot time the target's DDP step)
    rank_share.py  how much slower a rank runs beside N-1 others and what their DDP step
                   adds: N processes side by side in one Gloo group
    devices.py    device profiles (TOML, vendor data sheets); this machine's peaks, bandwidth
                  curve and convolution rate
    forecast.py   a bench run folder -> predictions (step, epoch, bound, interval)
    calibration.py  the validation errors the intervals come from (per model version)
    validate.py   `lungbench predict --validate`: predict, measure, compare on this machine
    validate_gpu.py  `--validate --gpu`: the same on a GPU node, and CPU -> GPU
    thesis.py     seed 000's M100 rows projected from a run on this machine

What may live here: the model and its inputs and validation, built on lungbench.measure and
lungbench.harness. What may not: argument parsing or printing (lungbench.commands.predict), or
starting a `lungbench` process: validation and the DDP probe receive a `launch` function from
the commands (lungbench.commands._launch).
"""
