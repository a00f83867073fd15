"""`lungbench bench`: the speed-up sweep (batch size x filters x device) of seed 000."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lungbench.commands._args import non_negative_int, positive_int

DESCRIPTION = """\
Measure how fast a 3D CNN trains: for every combination of filters x batch size x device
(x CPU threads), time the training step on resident tensors (warm-up off the clock, then
repeats; forward, backward and optimizer timed separately; median, IQR, p90/p95) and one
end-to-end epoch through the DataLoader ("Exec. time", the thesis's column), then write
the thesis's speed-up table, long-form CSV/JSONL and plots to results/<run-id>/.

With no options: CPU, the generated LIDC-like data set (754 nodules, epoch = the 603 of
the 80% training split), batch 2, 4, 8 x filters 8, 16; a few minutes on 2 cores."""

EPILOG = """\
examples:
  lungbench bench                                      the default CPU sweep
  lungbench bench --device cpu cuda --filters 8 16 --batch 2
                                                       the thesis's table: CPU vs 1 GPU
  lungbench bench --threads 1 2 --batch 2 --no-epoch   thread scaling, compute only
  lungbench bench --store lidc.h5 --epoch-samples 128  your own store, shorter epochs

output: results/<run-id>/{run.json, config.json, environment.json, records.jsonl,
        tables/{summary,measurements,speedup_b<B>}.csv|.md, plots/*.png}"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="speed-up sweep: batch size x filters x device (the thesis's table)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to measure")
    g.add_argument("--model", default="dualpath3d",
                   help="registered model (default: dualpath3d; see `--list-models`)")
    g.add_argument("--preset", default="default",
                   help="geometry preset of the two-path model: default (32^3), iso64 (64^3), "
                   "dey2018 (5x50x50) (default: default)")
    g.add_argument("--filters", type=positive_int, nargs="+", default=[8, 16],
                   help="base widths to sweep (default: 8 16, as the thesis)")
    g.add_argument("--batch", type=positive_int, nargs="+", default=[2, 4, 8],
                   help="batch sizes to sweep (default: 2 4 8)")
    g.add_argument("--device", nargs="+", default=["cpu"],
                   help="devices: cpu, cuda, cuda:N (default: cpu); the first is the "
                   "speed-up baseline")
    g.add_argument("--threads", type=positive_int, nargs="+", default=None,
                   help="CPU intra-op thread counts to sweep (default: torch's, all cores)")
    g.add_argument("--list-models", action="store_true", help="list registered models and exit")
    m = p.add_argument_group("how to measure")
    m.add_argument("--warmup", type=non_negative_int, default=3,
                   help="warm-up steps off the clock (default: 3)")
    m.add_argument("--repeats", type=positive_int, default=10,
                   help="timed steps per configuration (default: 10)")
    m.add_argument("--no-epoch", dest="epoch", action="store_false",
                   help="skip the end-to-end epoch; the table then uses the step time")
    m.add_argument("--epoch-samples", type=positive_int, default=None,
                   help="samples per timed epoch (default: the whole 80%% training split)")
    m.add_argument("--workers", type=non_negative_int, default=0,
                   help="DataLoader worker processes for the epoch (default: 0)")
    m.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    d = p.add_argument_group("data and output")
    d.add_argument("--store", default=None,
                   help="HDF5 store to train the epoch on (default: generated LIDC-like set, "
                   "cached in OUT/data/)")
    d.add_argument("--synth-n", type=positive_int, default=754,
                   help="size of the generated set when no --store (default: 754)")
    d.add_argument("--out", default="results", help="output root (default: results)")
    d.add_argument("--run-id", default=None, help="run folder name (default: bench-<UTC>-<host>)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.models import list_models

    if args.list_models:
        print("\n".join(list_models()))
        return 0
    from lungbench.benchrun import BenchRequest, run_bench

    request = BenchRequest(
        model=args.model, preset=args.preset, filters=tuple(args.filters),
        batch_sizes=tuple(args.batch), devices=tuple(args.device),
        threads=tuple(args.threads) if args.threads else (None,), warmup=args.warmup,
        repeats=args.repeats, epoch=args.epoch, epoch_samples=args.epoch_samples,
        num_workers=args.workers, seed=args.seed,
        store=Path(args.store) if args.store else None, synth_n=args.synth_n,
        out=Path(args.out), run_id=args.run_id,
    )
    result = run_bench(request, log=lambda text: print(text, file=sys.stderr))
    print(result.table_text)
    print(f"\nresults: {result.run_dir}")
    print(json.dumps({"configs": len(result.records),
                      "failed": sum(r["status"] != "ok" for r in result.records)}))
    return 0
