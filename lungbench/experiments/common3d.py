"""Layer 11 (experiments): Pieces shared by the 3D experiments (lidc-pretrain, lungx-cv, mosmed).

Generated default stores cached under OUT/data/, store checks (kind, inputs, grid), and the
run-folder preamble (training_run, from lungbench.experiments.resumable: stopped runs keep
the tables of what finished and can be resumed), and the TrainConfig fields they offer as
command-line options.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungbench.core.errors import UsageError
from lungbench.data.store import StoreDataset, StoreInfo
from lungbench.experiments.resumable import training_run  # noqa: F401 - the recipes' run folder

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

CACHE_LIMIT_BYTES = 1 << 30  # keep a split in memory when it is smaller than this

# The TrainConfig fields that lidc-pretrain, lungx-cv and mosmed offer as options, as
# declared on TrainConfig (lungbench.core.options.nested).
TRAIN_OPTIONS: dict[str, dict] = {
    name: {}
    for name in (
        "epochs",
        "batch_size",
        "lr",
        "optimizer",
        "schedule",
        "patience",
        "amp",
        "device",
        "num_workers",
        "seed",
        "telemetry_interval",
        "progress",
    )
}


def cached_store(out: Path, name: str, n: int, make: Callable[[Path, Callable], None]) -> Path:
    """OUT/data/NAME.h5, generated once with `make(path, progress)` and reused later."""
    path = Path(out) / "data" / f"{name}.h5"
    if not path.exists():
        log.info(f"generating {n} samples into {path} (generated data; reused by later runs)")
        with tqdm(total=n, desc="generate data", unit="sample", file=sys.stderr) as bar:
            make(path, bar.update)
    return path


def require_inputs(info: StoreInfo, inputs: Sequence[str], experiment: str, hint: str) -> None:
    """UsageError unless the store is a binary store with exactly these inputs."""
    if list(info.inputs) != list(inputs):
        raise UsageError(
            f"--store {info.path}: a {info.kind!r} store with inputs "
            f"{list(info.inputs)}; {experiment} needs inputs {list(inputs)} "
            f"({hint})"
        )
    if info.task != "binary" or len(info.label_names) != 2:
        raise UsageError(
            f"--store {info.path}: task {info.task!r} with labels "
            f"{info.label_names}; {experiment} needs two classes ({hint})"
        )


def nodule_preset(info: StoreInfo) -> str:
    """The dualpath3d geometry preset whose grids match a nodule store's cubes."""
    from lungbench.data.geometry import GEOMETRY_PRESETS

    grids = (info.inputs["context"][1:], info.inputs["zoom"][1:])
    for name, geo in GEOMETRY_PRESETS.items():
        if (tuple(geo.context_grid), tuple(geo.zoom_grid)) == grids:
            return name
    known = ", ".join(f"{n} {g.context_grid}" for n, g in GEOMETRY_PRESETS.items())
    raise UsageError(
        f"--store {info.path}: grid {grids[0]} / {grids[1]} matches no geometry "
        f"preset; choose a store made on one of: {known}"
    )


def split_dataset(info: StoreInfo, indices: np.ndarray) -> StoreDataset:
    """A StoreDataset over `indices`, kept in memory when small (epochs re-read it)."""
    sample_bytes = sum(4 * int(np.prod(s)) for s in info.inputs.values())
    return StoreDataset(
        info.path, indices=indices, cache=sample_bytes * len(indices) < CACHE_LIMIT_BYTES
    )


def data_word(info: StoreInfo) -> str:
    """For plot titles: 'generated data' or the store's file name."""
    return "generated data" if info.provenance.get("generator") else info.path.name


def store_run_config(
    name: str, cfg: object, info: StoreInfo, data_seed: int, **more: object
) -> dict[str, object]:
    """config.json of recipe `name` trained on store `info`: its config, the store, what its
    data are and the seed that made them, and `more`."""
    data = {"data": data_note(info), "data_seed": data_seed}
    return {"experiment": name, "config": cfg, "store": info.path, **data, **more}


def data_note(info: StoreInfo) -> str:
    """'generated (...)' for the generators' stores, the file otherwise."""
    generator = info.provenance.get("generator")
    if generator:
        return f"GENERATED data ({generator}), not the real archive"
    return f"store {info.path} (kind {info.kind})"
