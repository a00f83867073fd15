"""Layer 9 (train): Test-time augmentation: average the predictions over flips and rotations of each image.

    probs = tta_probabilities(model, (images,), task="binary")          # (B,)
    probs, targets = tta_predict(model, dataset, batch_size=32)

The views act on the last two axes (the image plane; the axial plane of a 3D volume), the
same view on every input of a sample. Default views are the 8 symmetries of the square
(identity, 3 rotations by 90 degrees, and the 4 flips and transposes): nodule crops and CT
slices have no preferred orientation, so none of them moves an image off the data
distribution. Probabilities, not logits, are averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from lungbench.core.errors import look_up_option
from lungbench.data.loader import LoaderOptions, make_loader
from lungbench.train.metrics import to_probabilities

View = Callable[[torch.Tensor], torch.Tensor]


VIEWS: dict[str, View] = {
    "identity": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
    "hflip": lambda x: torch.flip(x, dims=(-1,)),
    "vflip": lambda x: torch.flip(x, dims=(-2,)),
    "transpose": lambda x: x.transpose(-2, -1),
    "antitranspose": lambda x: torch.rot90(x, 2, dims=(-2, -1)).transpose(-2, -1),
}


DEFAULT_VIEWS = tuple(VIEWS)


FLIP_VIEWS = ("identity", "hflip", "vflip")


@torch.no_grad()
def tta_probabilities(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    task: str = "binary",
    views: Sequence[str] = DEFAULT_VIEWS,
) -> torch.Tensor:
    """Mean probabilities over `views`: binary (B,), multilabel / multiclass (B, K)."""
    chosen = [VIEWS[look_up_option(v, VIEWS, what="TTA view")] for v in views]
    model.eval()
    total = None
    for view in chosen:
        probs = to_probabilities(model(*(view(x) for x in inputs)), task)
        total = probs if total is None else total + probs
    return total / len(chosen)


@torch.no_grad()
def tta_predict(
    model: nn.Module,
    dataset: Dataset,
    task: str = "binary",
    batch_size: int = 32,
    device: str = "cpu",
    views: Sequence[str] = DEFAULT_VIEWS,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, targets) over `dataset` in order, each averaged over `views`."""
    model = model.to(device)
    probs, targets = [], []
    loader = make_loader(dataset, LoaderOptions(batch_size, shuffle=False), torch.device(device))
    for inputs, target in loader:
        inputs = tuple(x.to(device) for x in inputs)
        probs.append(tta_probabilities(model, inputs, task, views).cpu())
        targets.append(target)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()
