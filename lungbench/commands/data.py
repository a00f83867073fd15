"""`lungbench data ...`: build HDF5 stores from generators or the real archives.

Each sub-command is a `register_<name>(sub)` function here; the work is in lungbench.data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from lungbench.commands._args import non_negative_int, positive_int
from lungbench.data.store import read_info
from lungbench.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build HDF5 stores (generated nodules, LIDC-IDRI, LUNGx, MosMedData, 2D images)",
        description="Build lungbench HDF5 stores. Every store is written to a temporary "
        "file and renamed when complete. Format: docs/store-format.md.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="SOURCE", required=True)
    register_synth(sub)
    register_info(sub)


def _output_path(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"--out {path}: is a directory; give a file name such as {path}/data.h5")
    return path


def register_synth(sub: argparse._SubParsersAction) -> None:
    from lungbench.data.synth import KINDS
    from lungbench.models.dualpath3d import GEOMETRY_PRESETS

    p = sub.add_parser(
        "synth",
        help="generate benign/malignant nodules (lidc-like or lungx-like sizes)",
        description="Generate a store of nodules in lung parenchyma. Benign: round, smooth, "
        "sometimes calcified; malignant: larger, lobulated, spiculated. --kind lungx draws "
        "both classes from one size distribution, so size alone does not separate them.",
    )
    p.add_argument("--kind", choices=KINDS, default="lidc", help="size model (default: lidc)")
    p.add_argument("--n", type=positive_int, default=754,
                   help="number of nodules (default: 754, the thesis's LIDC-IDRI count)")
    p.add_argument("--grid", choices=sorted(GEOMETRY_PRESETS), default="default",
                   help="geometry preset of the two cubes (default: default = 32^3, "
                   "context 64 mm at 2 mm, zoom 32 mm at 1 mm)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", required=True, type=str, help="output store (.h5)")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from lungbench.data.synth import write_synthetic_store
    from lungbench.models.dualpath3d import geometry

    out = _output_path(args.out)
    with tqdm(total=args.n, desc=f"synth {args.kind}", unit="nodule") as bar:
        write_synthetic_store(out, args.kind, args.n, geometry(args.grid), args.seed,
                              progress=bar.update)
    info = read_info(out)
    print(f"wrote {out}: {info.n} samples, inputs {info.inputs}, labels {info.label_names}")
    return 0


def register_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a store (shapes, labels, provenance)")
    p.add_argument("store", help="a lungbench .h5 store")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from lungbench.data.store import read_meta

    info = read_info(args.store)
    meta = read_meta(args.store)
    print(f"store      {info.path}")
    print(f"kind       {info.kind}   task {info.task}   format v{info.format_version}")
    print(f"samples    {info.n}")
    for name, shape in info.inputs.items():
        print(f"input      {name}: {shape} ({info.units[name]})")
    labels = meta["label"]
    if labels.ndim == 1:
        counts = {info.label_names[k]: int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    else:
        counts = dict(zip(info.label_names, labels.sum(axis=0).tolist()))
    print(f"labels     {counts}")
    print(f"provenance {json.dumps(info.provenance)[:300]}")
    return 0
