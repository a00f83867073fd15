"""Layer 11 (experiments): Pieces shared by the 2D transfer-learning experiments (chestxray, nodule2d).

Model building with transfer methods and weights (checked before a run starts), store
checks, label-column selection, the cost table and the "mean% (+/- std%)" tables of seed 004.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from lungbench.core.errors import UsageError
from lungbench.data.store import StoreInfo
from lungbench.models import create_model
from lungbench.report.training import mean_std_cell  # seed 004's cell, one definition
from lungbench.train.config import TrainConfig
from lungbench.train.costs import MIB, estimate_memory, min_gpus
from lungbench.train.transfer import FreezePlan, Method, apply_method, freeze_points, parse_method
from lungbench.train.weights import LoadReport, load_weights

# The seed's freeze depths ("first N layers"), where the network has them.
SEED_FREEZE_DEPTHS = {"resnet50": (10, 22, 40), "densenet121": (14, 39, 88)}
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121")


def model_kwargs(name: str, in_channels: int, out_channels: int, dropout: float) -> dict:
    """Builder options; ResNets use keras_compat so counts match seed 004's Keras table."""
    kwargs = {"in_channels": in_channels, "out_channels": out_channels, "dropout": dropout}
    if name.startswith("resnet"):
        kwargs["keras_compat"] = True
    return kwargs


def expand_methods(
    model_name: str, methods: Sequence[str], freeze: Sequence[str] | None
) -> list[Method]:
    """'A B C D' with B expanded into one B_<depth> per freeze depth (default: the seed's
    depths for ResNet50 / DenseNet121, every stage boundary for the other networks)."""
    probe = create_model(model_name, out_channels=1)
    if freeze:
        depths: Sequence[str | int] = freeze
    else:
        depths = SEED_FREEZE_DEPTHS.get(model_name) or list(freeze_points(probe).values())[1:]
    out: list[Method] = []
    for text in methods:
        if text.upper() == "B":
            out += [parse_method(f"B_{d}") for d in depths]
        else:
            out.append(parse_method(text))
    for method in out:  # fail before any training on a depth the network does not have
        if method.name == "B":
            apply_method(probe, method)
    return out


@dataclass(frozen=True)
class BuiltModel:
    model: nn.Module
    plan: FreezePlan
    load: LoadReport | None


def build_transfer_model(
    name: str, kwargs: dict, method: Method, weights: str | None, seed: int
) -> BuiltModel:
    """Create the network (seeded init), load `weights` unless method D, apply the method."""
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    report = None
    if method.uses_pretrained and weights is not None:
        report = load_weights(model, weights)
    plan = apply_method(model, method)
    return BuiltModel(model, plan, report)


def parse_weights(values: Sequence[str] | None) -> list[tuple[str, str]]:
    """['ImageNet=path.pth', ...] -> [(name, path)] (UsageError on a malformed item)."""
    out = []
    for text in values or ():
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise UsageError(
                f"--weights {text!r}: expected NAME=PATH, e.g. "
                "ImageNet=weights/resnet50-imagenet.pth"
            )
        out.append((name, path))
    return out


def check_weights(name: str, kwargs: dict, sources: Sequence[tuple[str, str]]) -> None:
    """Load every (source, path) into a probe of the network: a missing file or the weights
    of another network fail here, before any run folder, data or training."""
    if not sources:
        return
    probe = create_model(name, **kwargs)
    for _, path in sources:
        load_weights(probe, path)


def require_image(info: StoreInfo, experiment: str, hint: str) -> tuple[int, ...]:
    """The (C, H, W) shape of the store's one input 'image'; UsageError naming the store and
    its kind otherwise (a 3D nodule or CT store, say)."""
    shape = info.inputs.get("image")
    if list(info.inputs) != ["image"] or shape is None or len(shape) != 3:
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in info.inputs.items())
        raise UsageError(
            f"--store {info.path}: a {info.kind!r} store with inputs {shapes}; {experiment} "
            f"needs one 2D input 'image' of shape (C, H, W) ({hint})"
        )
    return tuple(shape)


class LabelColumns(Dataset):
    """A multi-label dataset restricted to some label columns: target (K,) -> (len(cols),)."""

    def __init__(self, dataset: Dataset, columns: Sequence[int]) -> None:
        self.dataset = dataset
        self.columns = list(columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        inputs, target = self.dataset[k]
        return inputs, target[self.columns]


class RepeatChannels(Dataset):
    """Grey images (1, H, W) repeated to `channels` (what RGB-pretrained pipelines feed)."""

    def __init__(self, dataset: Dataset, channels: int) -> None:
        self.dataset = dataset
        self.channels = channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        inputs, target = self.dataset[k]
        return tuple(x.expand(self.channels, *x.shape[1:]).contiguous() for x in inputs), target


def select_labels(label_names: Sequence[str], wanted: Sequence[str] | None, path: str) -> list[int]:
    """Column indices of `wanted` labels (all if None); UsageError naming unknown ones."""
    if not wanted:
        return list(range(len(label_names)))
    unknown = [w for w in wanted if w not in label_names]
    if unknown:
        raise UsageError(
            f"--labels {', '.join(unknown)}: not in the label list of {path}; "
            f"choose from: {', '.join(label_names)}"
        )
    return [list(label_names).index(w) for w in wanted]


def methods_table(
    folds: pd.DataFrame, metric: str, methods: Sequence[str], sources: Sequence[str]
) -> pd.DataFrame:
    """Rows: pretrained weights; columns: methods; cells: mean (+/- std) over folds."""
    table = pd.DataFrame(
        index=pd.Index(list(sources), name="pretrained weights"),
        columns=list(methods),
        dtype=object,
    )
    for (source, method), group in folds.groupby(["weights", "method"]):
        if source in table.index and method in table.columns:
            table.loc[source, method] = mean_std_cell(group[metric].tolist())
    return table.fillna("")


def cost_row(
    method: Method,
    built: BuiltModel,
    config: TrainConfig,
    epoch_seconds: Sequence[float],
    sample_shapes,
    gpu_memory_gb: float,
    cuda_peak: int | None,
) -> dict:
    """One row of the cost table of `built` trained by `config` (its batch size, device and
    optimizer; see lungbench.train.costs for how memory is counted)."""
    plan, batch_size = built.plan, config.batch_size
    estimate = estimate_memory(built.model, sample_shapes, config.optimizer)
    measured = cuda_peak if config.device.startswith("cuda") and cuda_peak else None
    memory = measured if measured is not None else estimate.total(batch_size)
    gpus = min_gpus(estimate, batch_size, gpu_memory_gb)
    later = list(epoch_seconds[1:]) or list(epoch_seconds)
    return {
        "method": "C/D" if method.name in "CD" else method.label,
        "batch_size": batch_size,
        "min_gpus": gpus if gpus is not None else "does not fit",
        "time_per_epoch_s": float(np.median(later)),
        "trainable_parameters": plan.trainable,
        "peak_memory_mib": round(memory / MIB, 1),
        "memory_kind": "cuda_max_allocated" if measured is not None else "estimated",
        "per_sample_activations_mib": round(estimate.per_sample / MIB, 2),
        "epochs_timed": len(later),
    }


def store_or_generated(
    store: str | Path | None,
    path: Path,
    n: int,
    what: tuple[str, str],
    generate: Callable[[Path, Callable[[int], Any]], None],
) -> Path:
    """The user's store, or the generated one at `path`: made once by `generate(path,
    progress)` (`what`: the samples' name and unit on the progress bar), and reused by a
    resumed run (stores are written whole: a temporary file, renamed)."""
    if store is not None:
        return Path(store)
    if not path.exists():
        name, unit = what
        with tqdm(total=n, desc=f"generate {name}", unit=unit, file=sys.stderr) as bar:
            generate(path, bar.update)
    return path


def fmt_parameters(table: pd.DataFrame) -> pd.DataFrame:
    """Thousands separators for the parameter column, as the seed prints them."""
    out = table.copy()
    out["trainable_parameters"] = [f"{int(v):,}" for v in out["trainable_parameters"]]
    return out
